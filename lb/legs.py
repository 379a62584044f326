"""One attempt of one leg on one chosen backend — what the proxy (lb/proxy.py) sequences.

An attempt is always the same four things: a lease on the backend (its in-flight requests
and tokens, refunded on every exit), the call through the backends' facade or the stream
wing, the health report (success, or a failure that counts towards ejection), and the
metrics. The proxy decides which backend, how many attempts and in what order; this module
never retries and never picks.

The errors an attempt raises say what the proxy may do next: :class:`PrefillFailed` (try
another prefill), :class:`BackendConnectError` (the decode was never reached: the same
handoff may go to another decode), :class:`RedoPrefill` (the decode had the request and may
have consumed the prefill's KV: prefill again first), anything else: give up.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from lb.accesslog import RequestRecord
from lb.backends.health import HealthChecker
from lb.backends.pool import Backend, Pool
from lb.backends.upstream import Upstream
from lb.config import Config
from lb.connectors.base import BackendRef, Connector, Dispatch, PrefillResult, RequestView
from lb.errors import (
    BackendConnectError,
    BackendUnavailable,
    PdlbError,
    PrefillFailed,
    UpstreamError,
)
from lb.kvroute import KVRoute
from lb.metrics import Metrics
from lb.migration import StreamBroken
from lb.request import ProxyRequest, dumps
from lb.stream.answer import Answer, PendingPrefill
from lb.stream.port import ClientSide
from lb.tracing import OFF, Tracing, now_ns
from policies.base import RouteRequest

# Client headers a backend may need; everything else (cookies, hop-by-hop, host) stays here.
FORWARDED_HEADERS = ("x-data-parallel-rank", "traceparent", "tracestate")


class RedoPrefill(Exception):
    """The decode leg failed in a way that may have consumed the prefill's KV."""


class Legs:
    """The prefill and decode attempts of every request, with what they share."""

    def __init__(self, config: Config, pools: Mapping[str, Pool], upstream: Upstream,
                 connector: Connector, metrics: Metrics, health: HealthChecker,
                 kv: KVRoute, tracing: Tracing = OFF) -> None:
        self.config = config
        self.kv = kv
        self.tracing = tracing
        self.prefill_pool = pools["prefill"]
        self.decode_pool = pools["decode"]
        self.upstream = upstream
        self.connector = connector
        self.metrics = metrics
        self.health = health
        self.timeouts = config.server.timeouts
        self.answer = Answer(config, upstream, metrics)
        self._refs: dict[str, BackendRef] = {}

    async def prefill(
        self, view: RequestView, route: RouteRequest, backend: Backend, dispatch: Dispatch,
        headers: Mapping[str, str], record: RequestRecord,
    ) -> PrefillResult:
        """One prefill attempt. A 5xx, 429, timeout or unusable answer is PrefillFailed (the
        backend is reported); a 4xx is the backend judging the request: passed through."""
        body = dumps(self.connector.prefill_body(view, dispatch))
        record.prefill_backend = backend.url
        with self.prefill_pool.lease(backend, route.prompt_tokens) as lease, \
                self.tracing.stage("pdlb.prefill", **{"server.address": backend.url}):
            if self.tracing.enabled:
                headers = self.tracing.inject(dict(headers))
            ok = False
            try:
                response = await self.upstream.post_json(
                    backend.url + view.path, body, headers,
                    timeout_s=self.timeouts.prefill_s, what=f"prefill {backend.url}",
                )
                self.health.report_success(backend)
                result = self.connector.accept_prefill(response, dispatch)
                record.cached_tokens = result.cached_tokens
                self.kv.prefill_done(route, backend, result)
                ok = True
            except PrefillFailed as exc:
                self.metrics.prefill_failures.labels(reason=exc.reason).inc()
                raise
            except UpstreamError as exc:
                if exc.status < 500 and exc.status != 429:
                    raise  # the backend judged the request itself: pass its 4xx through
                reason = exc.code or "backend_error"
                self.metrics.prefill_failures.labels(reason=reason).inc()
                self.health.report_failure(backend)
                raise PrefillFailed(f"prefill failed: {exc.message}", reason=reason) from exc
            finally:
                record.prefill_s = duration = time.monotonic() - lease.started
                self.metrics.prefill.observe(duration)
                self.prefill_pool.finished(route, backend, ok, duration)
        return result

    async def decode(
        self, client: ClientSide, request: ProxyRequest, route: RouteRequest, backend: Backend,
        body: bytes, headers: Mapping[str, str], prefill: PrefillResult | None, started: float,
        pending: PendingPrefill | None = None,
    ) -> None:
        """One decode attempt, its answer relayed to the client. ``pending`` (concurrent
        connectors) is the prefill still in flight: its usage is awaited only when the final
        usage event needs it."""
        url = backend.url + request.path
        client.record.decode_backend = backend.url
        with self.decode_pool.lease(backend, route.prompt_tokens + route.max_tokens) as lease, \
                self.tracing.stage("pdlb.decode", **{"server.address": backend.url}):
            if self.tracing.enabled:
                headers = self.tracing.inject(dict(headers))
                decode_started_ns = now_ns()
            ok = False
            try:
                if request.stream:
                    await self.answer.stream(
                        client, request, url, body, headers, prefill, started, pending
                    )
                else:
                    await self.answer.json(
                        client, request, url, body, headers, prefill, started, pending
                    )
                ok = True
                self.health.report_success(backend)
                self.kv.decode_done(route, backend)
            except StreamBroken as broken:  # after the first byte: the proxy may migrate
                broken.backend = backend.url
                self.health.report_failure(backend)
                raise
            except UpstreamError as exc:
                self.metrics.upstream_errors.labels(
                    pool="decode", backend=backend.url, kind=exc.code or "error").inc()
                if exc.status >= 500 or isinstance(exc, BackendConnectError):
                    self.health.report_failure(backend)
                if _may_have_consumed_kv(exc):
                    raise RedoPrefill() from exc
                raise
            finally:
                self.decode_pool.finished(route, backend, ok, time.monotonic() - lease.started)
                if self.tracing.enabled:
                    self.tracing.handoff(decode_started_ns, client.record.handoff_s)

    def headers(
        self, pool: Pool, client: Mapping[str, str], request_id: str,
        extra: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """A leg's request headers: see :func:`backend_headers`."""
        return backend_headers(self.config, pool, client, request_id, extra)

    def ref(self, backend: Backend) -> BackendRef:
        """The connectors' view of a backend (one per URL, built once)."""
        ref = self._refs.get(backend.url)
        if ref is None:
            ref = self._refs[backend.url] = BackendRef.of(backend.url)
        return ref


def backend_headers(config: Config, pool: Pool, client: Mapping[str, str], request_id: str,
                    extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Headers of a call to one of ``pool``'s backends (a leg, or a pass-through route): the
    request id, the client headers a backend may need, ``extra`` (a connector's, over
    same-named ones), and the backend's key or the client's."""
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    for name in FORWARDED_HEADERS:
        value = client.get(name)
        if value is not None:
            headers[name] = value
    for name, value in (extra or {}).items():
        for old in [k for k in headers if k.lower() == name.lower()]:
            del headers[old]
        headers[name] = value
    if config.auth.forward_client_authorization and "authorization" in client:
        headers["Authorization"] = client["authorization"]
    elif pool.config.api_key:
        headers["Authorization"] = f"Bearer {pool.config.api_key}"
    return headers


def view(request: ProxyRequest) -> RequestView:
    """The connectors' view of a client request."""
    return RequestView(body=request.body, request_id=request.request_id,
                       endpoint=request.endpoint, path=request.path, stream=request.stream)


def cause(exc: BaseException) -> PdlbError:
    """The PdlbError behind a retry signal."""
    error = exc.__cause__ if isinstance(exc, RedoPrefill) else exc
    if not isinstance(error, PdlbError):
        raise TypeError(f"unexpected {type(error).__name__}") from exc
    return error


def _may_have_consumed_kv(exc: UpstreamError) -> bool:
    """A decode 5xx (not a timeout, not unreachable): the backend had the request and may
    have pulled the prefill's KV, so a retry needs a fresh prefill."""
    return (exc.status >= 500 and exc.status != 504
            and not isinstance(exc, BackendConnectError | BackendUnavailable))
