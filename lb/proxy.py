"""One request's journey: parse → count → admit → prefill leg → decode leg → relay.

This is the only module that sequences the stages; each stage is a call into its own module
(request, tokens, admission, pool + policies, connectors, upstream, relay), so the whole
path reads top to bottom in :meth:`Proxy.handle`.

Accounting invariants: the admission ticket and every backend lease are context managers,
so tokens and requests are refunded on every exit path — success, backend error, timeout,
and the CancelledError aiohttp raises in the handler when the client disconnects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

import aiohttp
import orjson
from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError

from lb.admission import Admission
from lb.config import Config
from lb.connectors.base import Connector, PrefillResult
from lb.errors import PdlbError, PrefillFailed, UpstreamError, error_payload
from lb.metrics import Metrics
from lb.pool import Backend, Pool
from lb.prefix import prefix_hashes
from lb.relay import DONE_EVENT, SSERelay, rewrite_response_usage, sse_event
from lb.request import Endpoint, ProxyRequest, dumps, parse_request
from lb.tokens import PromptTokenizer
from lb.upstream import Upstream
from policies.base import RouteRequest

log = logging.getLogger("pdlb.proxy")

# Client headers a backend may need; everything else (cookies, hop-by-hop, host) stays here.
FORWARDED_HEADERS = ("authorization", "x-data-parallel-rank", "traceparent", "tracestate")
# Tokens budgeted for a request that names no max_tokens (vLLM would allow up to the context).
DEFAULT_ASSUMED_MAX_TOKENS = 1024


class Proxy:
    def __init__(
        self,
        config: Config,
        pools: Mapping[str, Pool],
        admission: Admission,
        upstream: Upstream,
        connector: Connector,
        tokenizer: PromptTokenizer,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.prefill_pool = pools["prefill"]
        self.decode_pool = pools["decode"]
        self.admission = admission
        self.upstream = upstream
        self.connector = connector
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.timeouts = config.server.timeouts
        self._want_prefix = any(
            getattr(p.policy, "wants_prefix_hashes", False) for p in pools.values()
        )
        self._ttft = {e: metrics.ttft.labels(endpoint=e) for e in ("completions", "chat")}
        self._e2e = {e: metrics.e2e.labels(endpoint=e) for e in ("completions", "chat")}

    # ----------------------------------------------------------------- the journey
    async def handle(self, http: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        started = time.monotonic()
        raw = await http.read()
        headers = {k.lower(): v for k, v in http.headers.items()}
        request = parse_request(raw, endpoint, headers)

        t = time.perf_counter()
        prompt_tokens = await self.tokenizer.count(endpoint, request.body)
        self.metrics.tokenize.observe(time.perf_counter() - t)
        max_new = request.max_tokens or DEFAULT_ASSUMED_MAX_TOKENS

        with await self.admission.admit(prompt_tokens, prompt_tokens + max_new) as ticket:
            route = RouteRequest(
                request_id=request.request_id, leg="prefill", endpoint=endpoint,
                model=request.model, prompt_tokens=prompt_tokens, max_tokens=max_new,
                session_key=request.session_key,
                prefix_hashes=prefix_hashes(endpoint, request.body) if self._want_prefix else (),
                headers={k: v for k, v in headers.items() if k != "authorization"},
            )
            leg_headers = self._leg_headers(headers, request.request_id)

            prefill = await self._prefill(request, route, leg_headers)
            ticket.release("prefill")
            if prefill.prompt_tokens is not None and prefill.prompt_tokens != prompt_tokens:
                prompt_tokens = prefill.prompt_tokens
                ticket.resize("decode", prompt_tokens + max_new)
            prefill_done = time.monotonic()

            decode_route = _replace_leg(route, prompt_tokens)
            backend = self.decode_pool.pick(decode_route)
            body = dumps(self.connector.decode_body(request, prefill))
            url = backend.url + request.path
            with self.decode_pool.lease(backend, prompt_tokens + max_new) as lease:
                ok = False
                try:
                    if request.stream:
                        response = await self._relay_stream(
                            http, request, url, body, leg_headers, prefill, prefill_done, started
                        )
                    else:
                        response = await self._relay_json(
                            request, url, body, leg_headers, prefill, prefill_done, started
                        )
                    ok = True
                except UpstreamError:
                    self._count_backend_error(backend, "decode")
                    raise
                finally:
                    self.decode_pool.finished(
                        decode_route, backend, ok, time.monotonic() - lease.started
                    )
        self._e2e[endpoint].observe(time.monotonic() - started)
        return response

    # ----------------------------------------------------------------- prefill leg
    async def _prefill(
        self, request: ProxyRequest, route: RouteRequest, headers: Mapping[str, str]
    ) -> PrefillResult:
        backend = self.prefill_pool.pick(route)
        body = dumps(self.connector.prefill_body(request))
        with self.prefill_pool.lease(backend, route.prompt_tokens) as lease:
            ok = False
            try:
                response = await self.upstream.post_json(
                    backend.url + request.path, body, headers,
                    timeout_s=self.timeouts.prefill_s, what=f"prefill {backend.url}",
                )
                result = self.connector.accept_prefill(response, backend)
                ok = True
            except PrefillFailed as exc:
                self.metrics.prefill_failures.labels(reason=exc.reason).inc()
                raise
            except UpstreamError as exc:
                if exc.status < 500 and exc.status != 429:
                    raise  # the backend judged the request itself: pass its 4xx through
                reason = exc.code or "backend_error"
                self.metrics.prefill_failures.labels(reason=reason).inc()
                self._count_backend_error(backend, "prefill")
                raise PrefillFailed(f"prefill failed: {exc.message}", reason=reason) from exc
            finally:
                duration = time.monotonic() - lease.started
                self.metrics.prefill.observe(duration)
                self.prefill_pool.finished(route, backend, ok, duration)
        return result

    # ----------------------------------------------------------------- decode leg
    async def _relay_json(
        self, request: ProxyRequest, url: str, body: bytes, headers: Mapping[str, str],
        prefill: PrefillResult, prefill_done: float, started: float,
    ) -> web.Response:
        sent = time.monotonic()
        data = await self.upstream.post_json(
            url, body, headers, timeout_s=self.timeouts.first_byte_s, what=f"decode {url}"
        )
        now = time.monotonic()
        self.metrics.handoff.observe(now - prefill_done)
        self.metrics.decode.observe(now - sent)
        if rewrite_response_usage(data, prefill):
            self.metrics.usage_rewrites.inc()
        data.pop("kv_transfer_params", None)
        response = web.Response(
            body=orjson.dumps(data), content_type="application/json",
            headers={"X-Request-Id": request.request_id},
        )
        self._ttft[request.endpoint].observe(time.monotonic() - started)
        return response

    async def _relay_stream(
        self, http: web.Request, request: ProxyRequest, url: str, body: bytes,
        headers: Mapping[str, str], prefill: PrefillResult, prefill_done: float, started: float,
    ) -> web.StreamResponse:
        sent = time.monotonic()
        async with self.upstream.open_stream(url, body, headers, what=f"decode {url}") as upstream:
            self.metrics.handoff.observe(time.monotonic() - prefill_done)
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Request-Id": request.request_id,
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(http)
            relay = SSERelay(prefill)
            first = True
            loop = asyncio.get_running_loop()
            idle = self.timeouts.idle_s
            try:
                async with asyncio.timeout(loop.time() + self.timeouts.first_byte_s) as watchdog:
                    async for data in upstream.content.iter_any():
                        watchdog.reschedule(loop.time() + idle)
                        out = relay.feed(data)
                        if out:
                            await response.write(out)
                            if first:
                                first = False
                                self._ttft[request.endpoint].observe(time.monotonic() - started)
                    tail = relay.flush()
                    if tail:
                        await response.write(tail)
                if not relay.saw_done:
                    raise UpstreamError(
                        "decode stream ended before [DONE]", code="truncated_stream"
                    )
            except (ClientConnectionResetError, ConnectionResetError):
                # The client went away: close (not release) the decode connection so vLLM
                # aborts the request and frees its KV.
                self.metrics.client_disconnects.labels(phase="stream").inc()
                upstream.close()
                return response
            except (PdlbError, TimeoutError, OSError, aiohttp.ClientError) as exc:
                message, code = _describe_stream_failure(exc)
                log.warning("request %s: %s", request.request_id, message)
                await _finish_with_error(response, message, code)
                if relay.rewrites:
                    self.metrics.usage_rewrites.inc()
                self.metrics.decode.observe(time.monotonic() - sent)
                return response
            if relay.rewrites:
                self.metrics.usage_rewrites.inc()
            await response.write_eof()
        self.metrics.decode.observe(time.monotonic() - sent)
        return response

    # ----------------------------------------------------------------- helpers
    def _leg_headers(self, client: Mapping[str, str], request_id: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        for name in FORWARDED_HEADERS:
            value = client.get(name)
            if value is not None:
                headers[name] = value
        return headers

    def _count_backend_error(self, backend: Backend, kind: str) -> None:
        self.metrics.upstream_errors.labels(
            pool=backend.pool_name, backend=backend.url, kind=kind
        ).inc()


def _replace_leg(route: RouteRequest, prompt_tokens: int) -> RouteRequest:
    return RouteRequest(
        request_id=route.request_id, leg="decode", endpoint=route.endpoint, model=route.model,
        prompt_tokens=prompt_tokens, max_tokens=route.max_tokens,
        session_key=route.session_key, prefix_hashes=route.prefix_hashes, headers=route.headers,
    )


def _describe_stream_failure(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, PdlbError):
        return exc.message, exc.code or "upstream_error"
    if isinstance(exc, TimeoutError):
        return "decode stream stalled: no data within the idle timeout", "backend_timeout"
    return f"decode stream failed: {type(exc).__name__}", "backend_connection_lost"


async def _finish_with_error(response: web.StreamResponse, message: str, code: str) -> None:
    """After the 200 went out, the only honest end is an SSE error event, then [DONE]."""
    try:
        await response.write(sse_event(error_payload(message, "upstream_error", code)))
        await response.write(DONE_EVENT)
        await response.write_eof()
    except (ClientConnectionResetError, ConnectionResetError):
        pass

