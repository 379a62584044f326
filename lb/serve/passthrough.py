"""The pass-through routes: vLLM's other POST routes, answered by one backend of one pool.

``/tokenize``, ``/detokenize``, ``/v1/embeddings``, ``/pooling``, ``/score``, ``/rerank``...
(the route table, lb/serve/routes.py, names each one's pool) have nothing to disaggregate:
no KV is produced for a later decode, so there is no prefill → decode hop. pdlb forwards the
client's body untouched to one usable backend of the route's pool — the one with the fewest
requests in flight, ties taken in turn — and hands its answer back as it came: status
(a 4xx is the backend judging the request: passed through as is), ``Content-Type`` and body.

Around it, the same guard as a completion request (lb/serve/guard.py): client API keys,
``Content-Type`` and ``Content-Encoding`` checks, the body size limit (413) and body timeout
(408), errors as OpenAI-shaped JSON (backend unreachable: 502, no usable backend in the pool:
503, too slow: 504), ``pdlb_requests{endpoint,status}`` with the route's name as
``endpoint``, the backend's in-flight count while it works (a lease of no tokens), and one
access line. A backend that cannot be reached is reported to the health checker and the
request goes to another usable backend of the pool, once (nothing reached the first).

A route that ``streams`` (``/v1/responses``) relays an SSE answer as it comes (the head
within ``first_byte_s``, each read within ``idle_s``); a client that leaves closes the
backend connection, which makes vLLM abort the request.

``GET /version`` is pdlb's own: its version and each backend's ``/version`` answer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from lb.accesslog import CLIENT_DISCONNECT, AccessLog, RequestRecord
from lb.backends.health import HealthChecker
from lb.backends.pool import Backend, Pool
from lb.backends.upstream import Upstream, WholeAnswer
from lb.config import Config
from lb.errors import BackendConnectError, BackendUnavailable, PdlbError
from lb.legs import backend_headers
from lb.metrics import Metrics, pdlb_version
from lb.serve.aiohttpside import AiohttpSide
from lb.serve.guard import Guard, error_answer, internal_error
from lb.serve.models import ModelRouter
from lb.serve.routes import Route

log = logging.getLogger("pdlb.passthrough")

_ATTEMPTS = 2
"""A backend that cannot be reached got nothing: the request goes to one more."""


class PassThrough:
    """The handlers of the pass-through routes and of ``GET /version``."""

    def __init__(self, config: Config, pools: Mapping[str, Pool], upstream: Upstream,
                 health: HealthChecker, metrics: Metrics, guard: Guard,
                 router: ModelRouter) -> None:
        self._config = config
        self._pools = pools
        self._router = router
        self._upstream = upstream
        self._health = health
        self._metrics = metrics
        self._guard = guard
        self._access = AccessLog(config.log.access, config.log.format)
        self._turn = itertools.count()

    # -- a pass-through route
    def handler(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """The aiohttp handler of ``route`` (a route with a ``pool``)."""
        assert route.pool is not None

        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, route)

        return handle

    async def _serve(self, request: web.Request, route: Route) -> web.StreamResponse:
        client = AiohttpSide(request, self._guard)
        record = client.record = RequestRecord(time.monotonic())
        record.request_id = client.headers.get("x-request-id") or f"pdlb-{uuid.uuid4().hex}"
        try:
            try:
                self._guard.check_completion(client.headers)
                body = await client.body()
                response = await self._forward(route, body, client.headers, record, request)
            except PdlbError as exc:
                if exc.status >= 500:
                    log.warning("POST %s -> %d: %s", route.path, exc.status, exc.message)
                record.reason = exc.code
                response = _error_response(exc)
            except Exception:
                log.exception("unhandled error on POST %s", route.path)
                record.reason = "internal_error"
                response = _error_response(internal_error())
        except asyncio.CancelledError:
            self._metrics.client_disconnects.labels(phase="before_response").inc()
            record.reason = CLIENT_DISCONNECT
            self._finish(client, record, route, 499)
            raise
        self._finish(client, record, route, response.status)
        return response

    def _finish(self, client: AiohttpSide, record: RequestRecord, route: Route,
                status: int) -> None:
        self._metrics.requests.labels(endpoint=route.name, status=str(status)).inc()
        if self._access.enabled:
            self._access.emit(record, client=client.peer(), endpoint=route.name,
                              status=status)

    async def _forward(self, route: Route, body: bytes, client: Mapping[str, str],
                       record: RequestRecord, request: web.Request) -> web.StreamResponse:
        assert route.pool is not None and record.request_id is not None
        pool, body, lora = self._router.pools_for_body(body, route.pool)
        headers = self._headers(pool, client, record.request_id)
        tried: list[Backend] = []
        if lora is not None:  # only the backends that serve the adapter
            tried_or_lacking = [b for b in pool.backends if lora not in b.adapters]
        else:
            tried_or_lacking = []
        while True:
            try:
                backend = self._pick(pool, tried + tried_or_lacking)
            except BackendUnavailable:
                if not tried:
                    raise
                raise BackendConnectError(  # the first could not be reached; no other left
                    f"{route.pool} pool: {tried[-1].url} could not be reached and no other"
                    " backend is usable", code="backend_unreachable") from None
            tried.append(backend)
            if route.pool == "prefill":  # the leg, in whichever model group
                record.prefill_backend = backend.url
            else:
                record.decode_backend = backend.url
            try:
                if route.streams:
                    return await self._relay(request, pool, backend, route.path, body,
                                             headers, record.request_id)
                answer = await self._call(pool, backend, route.path, body, headers)
                break
            except BackendConnectError:
                if len(tried) >= _ATTEMPTS:
                    raise
        out = {"X-Request-Id": record.request_id}
        if answer.content_type:
            out["Content-Type"] = answer.content_type
        return web.Response(body=answer.body, status=answer.status, headers=out)

    async def _call(self, pool: Pool, backend: Backend, path: str, body: bytes,
                    headers: Mapping[str, str]) -> WholeAnswer:
        """One attempt on ``backend``, charged to its in-flight count; health reported."""
        with pool.lease(backend, 0):
            try:
                answer = await self._upstream.request_whole(
                    "POST", backend.url + path, body, headers,
                    timeout_s=self._config.server.timeouts.prefill_s,
                    what=f"POST {backend.url}{path}")
            except PdlbError as exc:
                self._metrics.upstream_errors.labels(
                    pool=pool.name, backend=backend.url, kind=exc.code or "error").inc()
                if isinstance(exc, BackendConnectError):
                    self._health.report_failure(backend)
                raise
        if answer.status >= 500:
            self._health.report_failure(backend)
        else:
            self._health.report_success(backend)
        return answer

    async def _relay(self, request: web.Request, pool: Pool, backend: Backend, path: str,
                     body: bytes, headers: Mapping[str, str], request_id: str
                     ) -> web.StreamResponse:
        """One attempt on ``backend`` whose answer may be an SSE stream: relayed as it
        comes; any other answer is read whole. Charged to its in-flight count until the
        last byte; health reported on the head."""
        what = f"POST {backend.url}{path}"
        with pool.lease(backend, 0):
            try:
                async with self._upstream.request_open(backend.url + path, body, headers,
                                                       what=what) as answer:
                    if answer.status >= 500:
                        self._health.report_failure(backend)
                    else:
                        self._health.report_success(backend)
                    out = {"X-Request-Id": request_id}
                    if answer.content_type:
                        out["Content-Type"] = answer.content_type
                    if not answer.content_type.startswith("text/event-stream"):
                        whole = b"".join([chunk async for chunk in answer.chunks])
                        return web.Response(body=whole, status=answer.status, headers=out)
                    response = web.StreamResponse(status=answer.status, headers=out)
                    await response.prepare(request)
                    try:
                        async for chunk in answer.chunks:
                            await response.write(chunk)
                    except PdlbError as exc:
                        # The head is gone: cut the client's connection too, so it sees a
                        # truncated body (no last chunk), not a stream that merely ended.
                        log.warning("POST %s: stream cut: %s", path, exc.message)
                        self._metrics.upstream_errors.labels(
                            pool=pool.name, backend=backend.url, kind=exc.code or "error").inc()
                        response.force_close()
                        if request.transport is not None:
                            request.transport.close()
                        return response
                    await response.write_eof()
                    return response
            except PdlbError as exc:
                self._metrics.upstream_errors.labels(
                    pool=pool.name, backend=backend.url, kind=exc.code or "error").inc()
                if isinstance(exc, BackendConnectError):
                    self._health.report_failure(backend)
                raise

    def _pick(self, pool: Pool, exclude: list[Backend]) -> Backend:
        """The usable backend with the fewest requests in flight; ties in turn."""
        candidates = [b for b in pool.backends if b.usable() and b not in exclude]
        if not candidates:
            reason = ("no healthy backend" if not pool.has_usable_backend()
                      else "every usable backend is excluded or at its token budget")
            raise BackendUnavailable(f"{pool.name} pool: {reason}",
                                     code=f"{pool.name}_unavailable")
        start = next(self._turn) % len(candidates)
        turned = candidates[start:] + candidates[:start]
        return min(turned, key=lambda b: b.inflight_requests)

    def _headers(self, pool: Pool, client: Mapping[str, str], request_id: str
                 ) -> dict[str, str]:
        """A completion leg's headers (:func:`lb.legs.backend_headers`), asking for an
        uncompressed answer: pdlb hands the body on as it came, without its encoding
        header."""
        return backend_headers(self._config, pool, client, request_id,
                               {"Accept-Encoding": "identity"})

    # -- GET /version
    async def version(self, request: web.Request) -> web.Response:
        """``{"version": pdlb's, "backends": {url: its /version answer, or {"error": ...}}}``
        — every listed backend of every pool, asked at once (health's ``timeout_s``)."""
        urls = list(dict.fromkeys(b.url for pool in self._pools.values()
                                  for b in pool.backends))
        timeout = self._config.health.timeout_s

        async def ask(url: str) -> Any:
            try:
                return await self._upstream.get_json(url + "/version", timeout_s=timeout)
            except PdlbError as exc:
                return {"error": exc.message}
            except orjson.JSONDecodeError:
                return {"error": f"GET {url}/version: not JSON"}

        answers = await asyncio.gather(*(ask(url) for url in urls))
        payload = {"version": pdlb_version(), "backends": dict(zip(urls, answers, strict=True))}
        return web.Response(body=orjson.dumps(payload), content_type="application/json")


def _error_response(exc: PdlbError) -> web.Response:
    answer = error_answer(exc)
    response = web.Response(body=answer.body, status=answer.status,
                            content_type="application/json", headers=answer.headers or None)
    if answer.close:
        response.force_close()
    return response
