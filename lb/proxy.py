"""One request's journey: parse → count → admit → prefill leg → decode leg → relay.

This is the only module that sequences the stages; each stage is a call into its own module
(request, tokens, admission, pool + policies, connectors, and lb/legs.py for one attempt of
one leg on one backend), so the whole path reads top to bottom in :meth:`Proxy.handle`.

Accounting invariants: the admission ticket and every backend lease are context managers,
so tokens and requests are refunded on every exit path — success, backend error, timeout,
and the CancelledError aiohttp raises in the handler when the client disconnects.

Retries (``[resilience]``), all within ``retry_budget_s`` of the request's arrival:

* prefill — connection error, 5xx, timeout or unusable answer (no kv_transfer_params):
  again on another prefill backend, up to ``prefill_attempts``;
* decode, before its first byte reached the client — connection refused: again on another
  decode backend with the same handoff (the prefill still holds the KV); a 5xx or a
  connection lost after the backend had the request: the prefill is redone first, since the
  KV may already have been pulled and freed;
* after the first byte (streams): the answer is continued in the same client stream by a
  continuation request run through this whole path again, up to ``migrate_attempts`` times
  (lb/migration.py, lb/stream/migrate.py, docs/migration.md); when it cannot be, the stream
  ends with an SSE error event + [DONE].
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping

from lb.admission import Admission, Ticket
from lb.backends.health import HealthChecker
from lb.backends.pool import Backend, Pool
from lb.backends.shared_sessions import SharedSessions
from lb.backends.upstream import Upstream
from lb.config import Config
from lb.connectors.base import Connector, Dispatch, HandshakeMode, PrefillResult, RequestView
from lb.errors import (
    BackendConnectError,
    BackendUnavailable,
    InvalidRequest,
    Overloaded,
    PdlbError,
    PrefillFailed,
)
from lb.kvroute import KVRoute
from lb.legs import Legs, RedoPrefill, cause, view
from lb.metrics import Metrics
from lb.migration import StreamBroken
from lb.prefix import prefix_hashes
from lb.request import Endpoint, ProxyRequest, dumps, parse_request
from lb.stream.answer import PendingPrefill
from lb.stream.migrate import Migrator
from lb.stream.port import ClientSide
from lb.tenants.gate import Tenants
from lb.tokens import PromptTokenizer
from lb.tracing import OFF, Tracing
from policies.base import Leg, RouteRequest, SessionKeyed

log = logging.getLogger("pdlb.proxy")

# Tokens budgeted for a request that names no max_tokens (vLLM would allow up to the context).
DEFAULT_ASSUMED_MAX_TOKENS = 1024

Parsed = tuple[bytes, ProxyRequest, str | None]
"""A request the model router already read: its body, its parsed form (``model`` already
the served name), and the LoRA adapter it names (None for a base model)."""


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
        health: HealthChecker,
        tracing: Tracing = OFF,
        sessions: SharedSessions | None = None,
        tenants: Tenants | None = None,
    ) -> None:
        self.config = config
        self.tracing = tracing
        self.sessions = sessions
        """``[cluster] share_sessions``: each session's backends, shared by the replicas."""
        self.tenants = tenants
        """``[tenants]``: identity, limits and metrics per tenant (lb/tenants/gate.py)."""
        self.prefill_pool = pools["prefill"]
        self.decode_pool = pools["decode"]
        self.admission = admission
        self.upstream = upstream
        self.connector = connector
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.health = health
        self.timeouts = config.server.timeouts
        self.resilience = config.resilience
        self.active_requests = 0
        self.kv = KVRoute(config, pools, upstream, metrics)
        self.legs = Legs(config, pools, upstream, connector, metrics, health, self.kv, tracing)
        self.migration = Migrator(config, self.legs.answer, metrics)
        self._e2e = {e: metrics.e2e.labels(endpoint=e) for e in ("completions", "chat")}
        self._direct = metrics.direct_decode

    # ----------------------------------------------------------------- the journey
    async def handle(self, client: ClientSide, endpoint: Endpoint,
                     parsed: Parsed | None = None) -> None:
        """Serve one request. ``parsed``: its body and parsed form when the model router
        (lb/serve/models.py) has read them already to pick this proxy's model group."""
        limit = self.config.server.max_concurrent_requests
        if limit is not None and self.active_requests >= limit:
            self.metrics.rejections.labels(stage="server", reason="too_many_requests").inc()
            raise Overloaded(f"pdlb is serving its limit of {limit} concurrent requests",
                             stage="server", reason="too_many_requests", status=503,
                             retry_after_s=1.0)
        self.active_requests += 1
        try:
            await self._handle(client, endpoint, parsed)
        finally:
            self.active_requests -= 1

    async def _handle(self, client: ClientSide, endpoint: Endpoint,
                      parsed: Parsed | None) -> None:
        started = time.monotonic()
        headers = client.headers
        if parsed is None:
            raw = client.whole_body if client.whole_body is not None else await client.body()
            request = parse_request(raw, endpoint, headers)
            lora = None
        else:
            raw, request, lora = parsed
        record = client.record
        record.request_id = request.request_id
        record.model = request.model
        self._check_max_tokens(request)
        if not request.stream or self.resilience.migrate_attempts == 0:
            return await self._journey(client, request, started, len(raw), lora)
        leg: ProxyRequest | None = self.migration.begin(request)
        while leg is not None:  # a stream whose decode breaks may go on elsewhere
            try:
                return await self._journey(client, leg, started, len(raw), lora)
            except StreamBroken as broken:
                leg = await self.migration.next(client, leg, broken)
            except PdlbError as exc:
                if leg.transcript is None or not leg.transcript.started:
                    raise
                return await self.migration.failed(client, leg, exc)  # a continuation's

    async def _journey(self, client: ClientSide, request: ProxyRequest, started: float,
                       raw_size: int, lora: str | None) -> None:
        """Count, admit, route and serve one request (again for a migrated stream's
        continuation, whose prompt holds what the client already received); ``lora``: the
        LoRA adapter it names, whose backends alone may serve it."""
        resumed = request.transcript is not None and request.transcript.started
        deadline = (time.monotonic() if resumed else started) + self.resilience.retry_budget_s
        endpoint = request.endpoint
        headers = client.headers
        record = client.record
        ids = None
        with self.tracing.stage("pdlb.tokenize"):
            if self.kv.enabled:
                t = time.perf_counter()
                ids = await self.kv.prompt_ids(endpoint, request.body, raw_size)
                record.tokenize_s = time.perf_counter() - t
            if ids is not None:
                prompt_tokens = len(ids)  # exact, and shared with routing
            elif self._exact_count_needed():
                t = time.perf_counter()
                prompt_tokens = await self.tokenizer.count(endpoint, request.body)
                record.tokenize_s = took = time.perf_counter() - t
                self.metrics.tokenize.observe(took)
            else:
                prompt_tokens = self.tokenizer.estimate(endpoint, request.body)
        if request.transcript is not None and not resumed:
            request.transcript.prompt_tokens = prompt_tokens  # until a prefill says better
        limit = self.config.server.max_prompt_tokens
        if limit is not None and prompt_tokens > limit:
            raise InvalidRequest(
                f"prompt has about {prompt_tokens} tokens; this server accepts at most {limit}",
                param="prompt" if endpoint == "completions" else "messages",
                code="prompt_too_long",
            )
        max_new = request.max_tokens or DEFAULT_ASSUMED_MAX_TOKENS
        route = RouteRequest(
            request_id=request.request_id, leg="prefill", endpoint=endpoint,
            model=request.model, prompt_tokens=prompt_tokens, max_tokens=max_new,
            session_key=request.session_key,
            prefix_hashes=(prefix_hashes(endpoint, request.body, seed=lora)
                           if self._want_prefix else ()),
            headers={k: v for k, v in headers.items() if k != "authorization"},
            prompt_token_ids=ids,
            lora=lora,
        )
        # Prompt logprobs, beam search: vLLM's decode reads no pulled KV, it computes it all.
        direct = request.decode_alone or self._skip_prefill(prompt_tokens)
        holder = None
        if not direct:
            holder = self.kv.direct(route)
            direct = holder is not None

        prefill_need = 0 if direct else prompt_tokens
        record.prompt_tokens = prompt_tokens
        queued = time.monotonic()
        grant = flow = None
        if self.tenants is not None:
            if resumed:  # a migrated stream's continuation: counted once, on arrival
                flow = self.tenants.identify(headers)[1]
            else:
                grant = await self.tenants.enter(client, prompt_tokens + max_new)  # 429 over
                flow = grant.flow
        lookup = self._session_lookup(route)  # overlaps admission's round trip
        try:
            with self.tracing.stage("pdlb.admission"):
                ticket = await self.admission.admit(prefill_need, prompt_tokens + max_new,
                                                    flow)
        except BaseException as exc:
            if lookup is not None:
                lookup.cancel()
            if grant is not None:
                grant.refused(exc)
            raise
        record.queue_s = time.monotonic() - queued
        if grant is not None:
            ticket.then(grant.admitted())
        with ticket:
            if lookup is not None:
                route = dataclasses.replace(route, shared_session=await lookup)
            if direct:
                ticket.release("prefill")
                self._direct.inc()
                if holder is not None:
                    self.metrics.kv_skipped_prefill.inc()
                await self._decode_only(client, request, route, started, deadline, holder)
            elif self.connector.mode is HandshakeMode.CONCURRENT:
                route = self.kv.for_leg(route, "prefill")
                await self._concurrent(client, request, route, ticket, started, deadline)
            else:
                route = self.kv.for_leg(route, "prefill")
                await self._sequential(client, request, route, ticket, started, deadline)
        self._e2e[endpoint].observe(time.monotonic() - started)

    def _exact_count_needed(self) -> bool:
        """Whether a limit depends on the exact prompt count (see [tokenizer] count)."""
        return (self.config.tokenizer.count == "always"
                or self.config.server.max_prompt_tokens is not None
                or self.resilience.direct_decode_below_tokens > 0
                or self.admission.has_budget()
                or self.prefill_pool.has_token_limits
                or self.decode_pool.has_token_limits
                or (self.tenants is not None and self.tenants.counts_tokens))

    def _skip_prefill(self, prompt_tokens: int) -> bool:
        """Conditional disaggregation: short prompts, or a dead prefill pool when allowed."""
        if prompt_tokens < self.resilience.direct_decode_below_tokens:
            return True
        return (self.resilience.prefill_fallback == "decode_only"
                and not self.prefill_pool.has_usable_backend())

    # ----------------------------------------------------------------- strategies
    async def _sequential(
        self, client: ClientSide, request: ProxyRequest, route: RouteRequest, ticket: Ticket,
        started: float, deadline: float,
    ) -> None:
        """Prefill, then decode with what it returned. Decode retries before the first byte:
        same handoff when the connector allows it and the decode was never reached; else a
        fresh prefill first (the KV may have been consumed)."""
        tried = self._avoided(request)
        handoff: tuple[PrefillResult, Dispatch] | None = None
        request_view = view(request)
        decode_first = self.connector.mode is HandshakeMode.DECODE_FIRST
        attempts = self.resilience.decode_attempts
        for attempt in range(1, attempts + 1):
            decode_backend = (self._pick(self.decode_pool, self.kv.for_leg(route, "decode"),
                                         tried) if decode_first else None)
            if handoff is None:
                handoff = await self._prefill(request_view, route, client, deadline,
                                              decode_backend)
                ticket.release("prefill")
                if handoff is None:  # prefill pool down and decode_only fallback allowed
                    self._direct.inc()
                    return await self._decode_only(client, request, route, started, deadline)
                route = self._corrected(route, handoff[0], ticket)
            prefill, dispatch = handoff
            decode_route = self.kv.for_leg(route, "decode")
            backend = decode_backend or self._pick(self.decode_pool, decode_route, tried)
            tried.append(backend)
            body = dumps(self.connector.decode_body(request_view, dispatch, prefill))
            headers = self.legs.headers(self.decode_pool, client.headers, dispatch.request_id,
                                        dispatch.decode_headers)
            try:
                return await self.legs.decode(client, request, decode_route, backend, body,
                                              headers, prefill, started)
            except (BackendConnectError, RedoPrefill) as exc:
                error = self._retry_or_raise(exc, attempt, attempts, deadline, "decode")
                never_reached = error.code == "backend_connect_error"
                if not (never_reached
                        and self.connector.mode is HandshakeMode.SEQUENTIAL_REUSABLE):
                    handoff = None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _concurrent(
        self, client: ClientSide, request: ProxyRequest, route: RouteRequest, ticket: Ticket,
        started: float, deadline: float,
    ) -> None:
        """Both legs at once. A leg that fails before the decode's first byte cancels the
        other and the pair is retried with a fresh dispatch; the client leaving cancels both."""
        prefill_tried: list[Backend] = []
        decode_tried = self._avoided(request)
        decode_route = self.kv.for_leg(route, "decode")
        request_view = view(request)
        attempts = max(self.resilience.prefill_attempts, self.resilience.decode_attempts)
        for attempt in range(1, attempts + 1):
            prefill_backend = self._pick(self.prefill_pool, route, prefill_tried)
            decode_backend = self._pick(self.decode_pool, decode_route, decode_tried)
            prefill_tried.append(prefill_backend)
            decode_tried.append(decode_backend)
            dispatch = self.connector.new_dispatch(request_view, self.legs.ref(prefill_backend),
                                                   self.legs.ref(decode_backend))
            prefill_task = asyncio.create_task(self.legs.prefill(
                request_view, route, prefill_backend, dispatch,
                self.legs.headers(self.prefill_pool, client.headers, dispatch.request_id,
                                  dispatch.prefill_headers), client.record))
            prefill_task.add_done_callback(lambda _: ticket.release("prefill"))
            pending = PendingPrefill(prefill_task, self.timeouts.prefill_s)
            body = dumps(self.connector.decode_body(request_view, dispatch, None))
            headers = self.legs.headers(self.decode_pool, client.headers, dispatch.request_id,
                                        dispatch.decode_headers)
            decode_task = asyncio.create_task(self.legs.decode(
                client, request, decode_route, decode_backend, body, headers, None, started,
                pending))
            try:
                done, _ = await asyncio.wait({prefill_task, decode_task},
                                             return_when=asyncio.FIRST_EXCEPTION)
                if decode_task in done:
                    return decode_task.result()  # raises the decode's error, if any
                if not pending.responding.is_set():
                    prefill_task.result()  # a failed prefill abandons the silent decode
                return await decode_task
            except (PrefillFailed, BackendConnectError, RedoPrefill) as exc:
                leg: Leg = "prefill" if isinstance(exc, PrefillFailed) else "decode"
                self._retry_or_raise(exc, attempt, attempts, deadline, leg)
            finally:
                for task in (decode_task, prefill_task):
                    if not task.done():
                        task.cancel()
                await asyncio.gather(prefill_task, decode_task, return_exceptions=True)
                ticket.release("prefill")
        raise AssertionError("unreachable")  # pragma: no cover

    async def _decode_only(
        self, client: ClientSide, request: ProxyRequest, route: RouteRequest, started: float,
        deadline: float, first: Backend | None = None,
    ) -> None:
        """No prefill hop: the decode backend computes the prompt itself. ``first``: the
        decode the policy named for it (it holds the prompt), tried first while usable."""
        tried = self._avoided(request)
        body = dumps(request.body)
        headers = self.legs.headers(self.decode_pool, client.headers, request.request_id)
        decode_route = self.kv.for_leg(route, "decode")
        attempts = self.resilience.decode_attempts
        for attempt in range(1, attempts + 1):
            if attempt == 1 and first is not None and first.usable():
                backend = first
            else:
                backend = self._pick(self.decode_pool, decode_route, tried)
            tried.append(backend)
            try:
                return await self.legs.decode(client, request, decode_route, backend, body,
                                              headers, None, started)
            except (BackendConnectError, RedoPrefill) as exc:
                self._retry_or_raise(exc, attempt, attempts, deadline, "decode")
        raise AssertionError("unreachable")  # pragma: no cover

    def _corrected(self, route: RouteRequest, prefill: PrefillResult, ticket: Ticket
                   ) -> RouteRequest:
        """Replace pdlb's prompt estimate with the prefill's count in route and ticket."""
        real = prefill.prompt_tokens
        if real is None or real == route.prompt_tokens:
            return route
        ticket.resize("decode", real + route.max_tokens)
        return dataclasses.replace(route, prompt_tokens=real)

    # ----------------------------------------------------------------- prefill retries
    async def _prefill(
        self, request_view: RequestView, route: RouteRequest, client: ClientSide,
        deadline: float, decode_backend: Backend | None,
    ) -> tuple[PrefillResult, Dispatch] | None:
        """The prefill leg with retries on other backends; None = skip to decode-only."""
        tried: list[Backend] = []
        for attempt in range(1, self.resilience.prefill_attempts + 1):
            try:
                backend = self._pick(self.prefill_pool, route, tried)
            except BackendUnavailable:
                if self.resilience.prefill_fallback == "decode_only":
                    return None
                raise
            tried.append(backend)
            dispatch = self.connector.new_dispatch(
                request_view, self.legs.ref(backend),
                None if decode_backend is None else self.legs.ref(decode_backend))
            headers = self.legs.headers(self.prefill_pool, client.headers, dispatch.request_id,
                                        dispatch.prefill_headers)
            try:
                result = await self.legs.prefill(request_view, route, backend, dispatch, headers,
                                                 client.record)
                return result, dispatch
            except PrefillFailed as exc:
                self._retry_or_raise(exc, attempt, self.resilience.prefill_attempts, deadline,
                                     "prefill")
                log.info("request %s: prefill on %s failed (%s); retrying",
                         request_view.request_id, backend.url, exc.reason)
        raise AssertionError("unreachable")  # pragma: no cover

    # ----------------------------------------------------------------- helpers
    def _check_max_tokens(self, request: ProxyRequest) -> None:
        limit = self.config.server.max_tokens_limit
        if limit is not None and request.max_tokens is not None and request.max_tokens > limit:
            raise InvalidRequest(
                f"max_tokens = {request.max_tokens} exceeds this server's limit of {limit}",
                param="max_tokens", code="max_tokens_too_large",
            )

    def _avoided(self, request: ProxyRequest) -> list[Backend]:
        """Decodes a migrating stream broke on: its continuation tries others first."""
        t = request.transcript
        if t is None or not t.avoid:
            return []
        return [b for b in self.decode_pool.backends if b.url in t.avoid]

    def _pick(self, pool: Pool, route: RouteRequest, tried: list[Backend]) -> Backend:
        """A backend not tried yet when there is one, else any usable one."""
        backend = None
        if tried:
            with contextlib.suppress(BackendUnavailable):
                backend = pool.pick(route, exclude=tried)
        if backend is None:
            backend = pool.pick(route)
        self.kv.picked(pool, route, backend)
        if self.sessions is not None and isinstance(pool.policy, SessionKeyed):
            key = pool.policy.session_key(route)
            if key and route.shared_session.get(pool.name) != backend.url:
                self.sessions.put(key, pool.name, backend.url)
        return backend

    def _session_lookup(self, route: RouteRequest) -> asyncio.Task[dict[str, str]] | None:
        """``[cluster] share_sessions``: start reading the session's shared backends."""
        if self.sessions is None:
            return None
        for pool in (self.prefill_pool, self.decode_pool):
            if isinstance(pool.policy, SessionKeyed):
                key = pool.policy.session_key(route)
                if key:
                    return asyncio.ensure_future(self.sessions.get(key))
        return None

    @property
    def _want_prefix(self) -> bool:
        """Whether a pool's policy reads RouteRequest.prefix_hashes; asked per request, since
        a reload may change the policies."""
        return (self.prefill_pool.policy.wants_prefix_hashes
                or self.decode_pool.policy.wants_prefix_hashes)

    def _retry_or_raise(self, exc: BaseException, attempt: int, attempts: int,
                        deadline: float, leg: Leg) -> PdlbError:
        """The error behind a failed attempt, counted as a retry when another attempt may
        start (raised when none may: the last attempt, or past the retry budget)."""
        error = cause(exc)
        if attempt == attempts or time.monotonic() > deadline:
            raise error from None
        reason = error.reason if isinstance(error, PrefillFailed) else error.code or "error"
        self.metrics.retries.labels(leg=leg, reason=reason).inc()
        return error
