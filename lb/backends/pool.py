"""Backends and pools: health, in-flight accounting, and the policy that picks among them.

In-flight accounting has one rule: every acquire has exactly one release. A :class:`Lease`
is a context manager that charges a backend (and its pool) with requests and tokens when
entered and refunds exactly what it charged when left — on success, error, timeout and
cancellation alike. The charge is fixed when the lease is taken; where the prefill answers
first, the proxy takes the decode lease with the prefill's real ``usage.prompt_tokens``
instead of pdlb's estimate (and corrects the admission ticket, ``Ticket.resize``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from lb.config import PoolConfig
from lb.errors import BackendUnavailable
from lb.metrics import Metrics
from policies.base import (
    DirectDecode,
    Policy,
    PolicyHooks,
    RouteRequest,
    ScrapedLoad,
    wants_cached_tokens,
)
from policies.choose import NoCandidate, NotACandidate, choose

if TYPE_CHECKING:  # the index's package imports this module (its fleet follows pools)
    from lb.backends.kvevents.lookup import PoolKV


class Backend:
    """One vLLM server in a pool. Mutable state lives here; policies see it read-only."""

    __slots__ = (
        "adapters", "consecutive_failures", "consecutive_successes", "healthy", "index",
        "inflight_requests", "inflight_tokens", "load", "max_inflight_tokens", "models",
        "others_requests", "others_tokens", "pending", "pool_name", "tokens_since_scrape",
        "url",
    )

    def __init__(self, url: str, index: int, pool_name: str, max_inflight_tokens: int | None,
                 *, pending: bool = False):
        self.url = url
        self.index = index
        self.pool_name = pool_name
        self.max_inflight_tokens = max_inflight_tokens
        self.pending = pending
        """Added while pdlb runs (a reload, discovery) and not yet through its first health
        check (and model check): out of rotation until then."""
        self.healthy = not pending
        self.inflight_requests = 0
        self.inflight_tokens = 0
        self.load: ScrapedLoad | None = None
        self.tokens_since_scrape = 0
        self.models: frozenset[str] | None = None
        """The base model ids it serves (from /v1/models once healthy); None until known."""
        self.adapters: frozenset[str] = frozenset()
        """The LoRA adapters it serves (/v1/models entries with a ``parent``), as of the last
        health round: a request naming one goes only to backends that list it."""
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.others_requests = 0
        self.others_tokens = 0
        """What the other pdlb replicas have in flight here (``[cluster] share_loads``; as
        last read from Redis, lb/backends/shared_loads.py); 0 without a cluster."""

    def usable(self) -> bool:
        if not self.healthy:
            return False
        limit = self.max_inflight_tokens
        return limit is None or self.inflight_tokens < limit

    @property
    def group(self) -> str:
        """Its model group: the ``[models]`` name of its pool, "" for the top-level pools."""
        return self.pool_name.rpartition("/")[0]

    def __repr__(self) -> str:
        return f"Backend({self.pool_name}:{self.url})"


class GlobalView:
    """A backend as a policy sees it in a cluster: in-flight numbers are this replica's
    plus the other replicas' last published ones (per-backend budgets count them too)."""

    __slots__ = ("backend",)

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @property
    def url(self) -> str:
        return self.backend.url

    @property
    def index(self) -> int:
        return self.backend.index

    @property
    def healthy(self) -> bool:
        return self.backend.healthy

    @property
    def inflight_requests(self) -> int:
        return self.backend.inflight_requests + self.backend.others_requests

    @property
    def inflight_tokens(self) -> int:
        return self.backend.inflight_tokens + self.backend.others_tokens

    @property
    def tokens_since_scrape(self) -> int:
        return self.backend.tokens_since_scrape

    @property
    def load(self) -> ScrapedLoad | None:
        return self.backend.load

    def usable(self) -> bool:
        limit = self.backend.max_inflight_tokens
        return self.backend.healthy and (limit is None or self.inflight_tokens < limit)

    def __repr__(self) -> str:
        return f"GlobalView({self.backend!r})"


class Pool:
    """A named set of backends with one routing policy and pool-wide in-flight totals."""

    def __init__(self, config: PoolConfig, policy: Policy, metrics: Metrics) -> None:
        self.name = config.name
        self.config = config
        self.policy = policy
        self.hooks: PolicyHooks | None = policy if isinstance(policy, PolicyHooks) else None
        self.backends = [
            Backend(b.url, i, config.name, b.max_inflight_tokens)
            for i, b in enumerate(config.backends)
        ]
        self.inflight_requests = 0
        self.inflight_tokens = 0
        self.has_token_limits = any(b.max_inflight_tokens is not None for b in self.backends)
        self.metrics = metrics
        self.draining: dict[str, Backend] = {}
        """Removed backends that still have requests in flight, by URL: if the URL comes
        back (a flapping DNS answer, a pod that turns Ready again), the same object — and so
        the same counters — returns, as a pending backend."""
        self.kv: PoolKV | None = None
        """This pool's KV-event index when ``[kv_events]`` is on (set by the app):
        ``cached_tokens(prompt_token_ids)`` → ``{backend URL: cached tokens}`` for the
        backends whose events are live and fresh (absent = unknown)."""
        self.wants_cached_tokens = wants_cached_tokens(policy)
        self.direct: DirectDecode | None = policy if isinstance(policy, DirectDecode) else None
        self.global_view = False
        """``[cluster] share_loads``: policies see :class:`GlobalView` s of the backends."""
        self._register_metrics(metrics)

    def _register_metrics(self, metrics: Metrics) -> None:
        pool = {"pool": self.name}
        metrics.watch("pdlb_pool_inflight_tokens", "Tokens in flight per pool (prefill: being"
                      " prefilled; decode: KV held).", pool, lambda: self.inflight_tokens)
        metrics.watch("pdlb_pool_inflight_requests", "Requests in flight per pool.", pool,
                      lambda: self.inflight_requests)
        metrics.watch("pdlb_pool_usable_backends", "Backends currently usable per pool.", pool,
                      lambda: sum(1 for b in self.backends if b.healthy))
        for b in self.backends:
            self._watch_backend(b)

    _BACKEND_GAUGES = (
        ("pdlb_backend_inflight_tokens", "Tokens in flight per backend."),
        ("pdlb_backend_inflight_requests", "Requests in flight per backend."),
        ("pdlb_backend_healthy", "1 when the backend is in rotation."),
    )

    def _watch_backend(self, b: Backend) -> None:
        labels = {"pool": self.name, "backend": b.url}
        reads = (lambda: b.inflight_tokens, lambda: b.inflight_requests,
                 lambda: 1.0 if b.healthy else 0.0)
        for (name, doc), read in zip(self._BACKEND_GAUGES, reads, strict=True):
            self.metrics.watch(name, doc, labels, read)

    def replace_backends(self, config: PoolConfig, policy: Policy) -> tuple[list[str], list[str]]:
        """Hot reload (and discovery): adopt a new backend list and policy. Backends kept by
        URL keep their counters and health (in-flight leases refund them as usual); removed
        ones stop receiving new requests and finish what they have; added ones are pending
        (out of rotation) until their first health check passes. Returns (added, removed)
        URLs."""
        current = {b.url: b for b in self.backends}
        draining = {url: b for url, b in self.draining.items() if b.inflight_requests}
        backends = []
        added = []
        for i, bc in enumerate(config.backends):
            backend = current.pop(bc.url, None)
            if backend is None:
                backend = draining.pop(bc.url, None)
                if backend is None:
                    backend = Backend(bc.url, i, self.name, bc.max_inflight_tokens, pending=True)
                else:  # back while it still finishes requests: same counters, checked again
                    backend.pending, backend.healthy, backend.models = True, False, None
                    backend.consecutive_successes = 0
                self._watch_backend(backend)
                added.append(bc.url)
            backend.index = i
            backend.max_inflight_tokens = bc.max_inflight_tokens
            backends.append(backend)
        for gone in current.values():
            for name, _ in self._BACKEND_GAUGES:
                self.metrics.unwatch(name, {"pool": self.name, "backend": gone.url})
            if gone.inflight_requests:
                draining[gone.url] = gone
        self.draining = draining
        self.backends = backends
        self.has_token_limits = any(b.max_inflight_tokens is not None for b in backends)
        self.config = config
        self.policy = policy
        self.hooks = policy if isinstance(policy, PolicyHooks) else None
        self.wants_cached_tokens = wants_cached_tokens(policy)
        self.direct = policy if isinstance(policy, DirectDecode) else None
        return added, sorted(current)

    def has_usable_backend(self) -> bool:
        return any(b.healthy for b in self.backends)

    def pick(self, request: RouteRequest, exclude: Sequence[Backend] = ()) -> Backend:
        """Ask the policy for a backend among the usable ones (minus ``exclude``), through
        :func:`policies.choose.choose`, as ``policies.testing.simulate`` does."""
        lora = request.lora
        if lora is not None:
            exclude = [*exclude, *(b for b in self.backends if lora not in b.adapters)]
        try:
            if self.global_view:
                views = [GlobalView(b) for b in self.backends]
                return choose(self.policy, request, views,
                              [v for v in views if v.backend in exclude]).backend
            return choose(self.policy, request, self.backends, exclude)
        except NoCandidate:
            reason = "no healthy backend" if not self.has_usable_backend() else (
                f"no usable backend serves the LoRA adapter {lora!r} now"
                if lora is not None and not any(lora in b.adapters and b.usable()
                                                for b in self.backends)
                else "every usable backend is excluded or at its token budget")
            raise BackendUnavailable(f"{self.name} pool: {reason}",
                                     code=f"{self.name}_unavailable") from None
        except NotACandidate as exc:
            raise BackendUnavailable(f"{self.name} pool: {exc}", code="policy_error") from None

    def pick_direct(self, request: RouteRequest) -> Backend | None:
        """The policy's :class:`DirectDecode` answer: one backend to serve the request alone
        (no prefill hop), or None. Never raises: no usable backend is simply None."""
        if self.direct is None:
            return None
        if request.lora is not None:
            return None  # the adapter filter lives in pick(); direct decode is an optimisation
        if self.global_view:
            views = [v for v in map(GlobalView, self.backends) if v.usable()]
            chosen = self.direct.pick_direct(request, views) if views else None
            return next((v.backend for v in views if v is chosen), None)
        candidates = [b for b in self.backends if b.usable()]
        if not candidates:
            return None
        picked = self.direct.pick_direct(request, candidates)
        return next((b for b in candidates if b is picked), None)

    def cached_tokens(self, request: RouteRequest) -> dict[str, int] | None:
        """What the pool's fresh backends hold of the prompt, when its events are on and
        the request has token ids (else None)."""
        if self.kv is None or request.prompt_token_ids is None:
            return None
        return self.kv.cached_tokens(request.prompt_token_ids, request.model)

    def lease(self, backend: Backend, tokens: int) -> Lease:
        return Lease(self, backend, tokens)

    def finished(
        self, request: RouteRequest, backend: Backend, ok: bool, duration_s: float
    ) -> None:
        if self.hooks is not None:
            self.hooks.on_request_done(request, backend, ok, duration_s)


class Lease:
    """Charges one request and ``tokens`` to a backend and its pool while held."""

    __slots__ = ("_held", "backend", "pool", "started", "tokens")

    def __init__(self, pool: Pool, backend: Backend, tokens: int) -> None:
        self.pool = pool
        self.backend = backend
        self.tokens = tokens
        self._held = False
        self.started = 0.0

    def __enter__(self) -> Lease:
        if self._held:
            raise RuntimeError("lease entered twice")
        self._held = True
        self.started = time.monotonic()
        self.backend.inflight_requests += 1
        self.backend.inflight_tokens += self.tokens
        self.backend.tokens_since_scrape += self.tokens
        self.pool.inflight_requests += 1
        self.pool.inflight_tokens += self.tokens
        return self

    def release(self) -> None:
        """Refund early (idempotent); ``__exit__`` then does nothing."""
        if not self._held:
            return
        self._held = False
        self.backend.inflight_requests -= 1
        self.backend.inflight_tokens -= self.tokens
        self.pool.inflight_requests -= 1
        self.pool.inflight_tokens -= self.tokens

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

