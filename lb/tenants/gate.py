"""The one object the proxy calls for tenants: identity, limits, metrics (lb/proxy.py).

Per request, only when ``[tenants]`` is configured (otherwise the proxy holds None and pays
one attribute test): :meth:`Tenants.enter` finds the tenant and class, takes one request and
its tokens from the tenant's limits (429 :class:`~lb.tenants.limits.RateLimited` over one)
and puts the ``x-ratelimit-*`` headers on the client side, so that every answer carries them,
errors included. The :class:`Grant` it returns is marked :meth:`~Grant.admitted` once
admission let the request in and exited with the admission ticket when the request ends:
the tokens are trued up with the answer's usage and the in-flight count goes down.
:meth:`Grant.refused` is the other ending (admission said no).

Metrics, labelled with configured tenant names plus ``anonymous`` (bounded cardinality):
``pdlb_tenant_admitted_total{tenant,class}``, ``pdlb_tenant_rejected_total{tenant,reason}``
(``requests``, ``tokens``, ``concurrent`` from the limits; ``queue_full``, ``queue_timeout``,
``shed``, ``too_large`` from admission), ``pdlb_tenant_tokens_total{tenant}`` (used tokens:
the usage when the answer reported one, else as admitted), and
``pdlb_tenant_queue_wait_seconds{tenant}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Protocol

from lb.accesslog import RequestRecord
from lb.errors import InvalidRequest, Overloaded, PayloadTooLarge, PdlbError
from lb.metrics import LATENCY_BUCKETS, Counter, CounterChild, Histogram, Metrics
from lb.tenants.config import ANONYMOUS, TenancyConfig, TenantConfig
from lb.tenants.fairqueue import Flow
from lb.tenants.limits import LocalLimits, RateLimited
from lb.tenants.redis_limits import Budgets, RedisLimits


class Client(Protocol):
    """What the gate uses of the proxy's :class:`lb.stream.port.ClientSide`."""

    headers: Mapping[str, str]
    record: RequestRecord
    answer_headers: Mapping[str, str] | None


def bearer_key(authorization: str) -> str:
    """The token of ``Bearer <token>`` (lb/serve/auth.py's rule; "" for anything else)."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class Forbidden(PdlbError):
    status = 403
    error_type = "permission_error"


class Held(Protocol):
    """What a request took from its tenant's limits (local or on Redis)."""

    headers: Mapping[str, str]

    def finish(self, real_tokens: int | None) -> None: ...


class Grant:
    """One request's tenant, class and what it took; once admitted, its exit (with the
    admission ticket's, :meth:`lb.admission.Ticket.then`) ends it."""

    __slots__ = ("_client", "_done", "_held", "_tenants", "admitted_tokens", "flow")

    def __init__(self, tenants: Tenants, flow: Flow, held: Held, client: Client,
                 tokens: int) -> None:
        self._tenants = tenants
        self.flow = flow
        self._held = held
        self._client = client
        self.admitted_tokens = tokens
        self._done = False

    def admitted(self) -> Grant:
        """Admission let the request in: count it; exit this when it ends."""
        m = self._tenants.metrics_of(self.flow.tenant)
        m.admitted[self.flow.level].inc()
        wait = self._client.record.queue_s
        if wait is not None:
            m.queue_wait.observe(wait)
        return self

    def __enter__(self) -> Grant:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        usage = self._client.record.usage
        real = None
        if usage is not None:
            prompt, output = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int) and isinstance(output, int):
                real = prompt + output
        self._finish(real)
        self._tenants.metrics_of(self.flow.tenant).tokens.inc(
            self.admitted_tokens if real is None else real)

    def refused(self, exc: BaseException) -> None:
        """Admission refused (or the client left while waiting): no tokens used."""
        if isinstance(exc, Overloaded | PayloadTooLarge):
            reason = exc.reason if isinstance(exc, Overloaded) else "too_large"
            self._tenants.metrics_of(self.flow.tenant).rejected(reason).inc()
        self._finish(0)

    def _finish(self, real: int | None) -> None:
        if not self._done:
            self._done = True
            self._held.finish(real)


class _TenantMetrics:
    __slots__ = ("_rejected", "_tenant", "admitted", "queue_wait", "tokens")

    def __init__(self, tenants: Tenants, tenant: str) -> None:
        self._tenant = tenant
        self._rejected = tenants.rejected_family
        self.admitted = [tenants.admitted_family.labels(tenant=tenant, **{"class": c})
                         for c in tenants.config.classes]
        self.tokens = tenants.tokens_family.labels(tenant=tenant)
        self.queue_wait = tenants.wait_family.labels(tenant=tenant)

    def rejected(self, reason: str) -> CounterChild:
        return self._rejected.labels(tenant=self._tenant, reason=reason)


class Tenants:
    def __init__(self, config: TenancyConfig, metrics: Metrics,
                 budgets: Budgets | None = None) -> None:
        self.config = config
        self._by_key = {key: t.name for t in config.tenants.values() for key in t.api_keys}
        self._anonymous = config.tenant(ANONYMOUS)
        self._levels = {c: i for i, c in enumerate(config.classes)}
        self._local = LocalLimits(config.tenants)
        self.counts_tokens = any(t.tokens is not None for t in config.tenants.values())
        """Whether a tenant has a tokens limit (then the proxy counts prompts exactly)."""
        self._shared = None
        if budgets is not None and any(t.limited for t in config.tenants.values()):
            self._shared = RedisLimits(config.tenants, budgets)
        r = metrics.registry
        self.admitted_family = Counter("pdlb_tenant_admitted", "Requests admitted, by tenant"
                                       " and priority class.", ["tenant", "class"], registry=r)
        self.rejected_family = Counter(
            "pdlb_tenant_rejected", "Requests refused, by tenant and reason (requests, tokens,"
            " concurrent: its limits; queue_full, queue_timeout, shed, too_large: admission).",
            ["tenant", "reason"], registry=r)
        self.tokens_family = Counter("pdlb_tenant_tokens", "Tokens used by ended requests"
                                     " (usage when reported, else as admitted), by tenant.",
                                     ["tenant"], registry=r)
        self.wait_family = Histogram("pdlb_tenant_queue_wait_seconds", "Time admitted requests"
                                     " waited in admission, by tenant.", ["tenant"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self._metrics = {name: _TenantMetrics(self, name)
                         for name in [*config.tenants, ANONYMOUS]}

    def metrics_of(self, tenant: str) -> _TenantMetrics:
        return self._metrics[tenant]

    def identify(self, headers: Mapping[str, str]) -> tuple[TenantConfig, Flow]:
        """The request's tenant (key, then the trusted header, else anonymous) and class
        (its own, or the one it asks for by header if its tenant may use it)."""
        name = None
        if self._by_key:
            authorization = headers.get("authorization")
            if authorization:
                name = self._by_key.get(bearer_key(authorization))
        if name is None and self.config.header is not None:
            given = headers.get(self.config.header)
            if given is not None and given.strip() in self.config.tenants:
                name = given.strip()
        tenant = self.config.tenants.get(name or ANONYMOUS) or self._anonymous
        level = self._levels[tenant.priority]
        asked = (headers.get(self.config.priority_header)
                 if self.config.priority_header is not None else None)
        if asked:
            asked = asked.strip().lower()
            wanted = self._levels.get(asked)
            if wanted is None:
                raise InvalidRequest(
                    f"unknown priority class {asked!r} in {self.config.priority_header}; the"
                    f" classes are {', '.join(self.config.classes)}", code="invalid_priority")
            if wanted != level and asked not in tenant.priorities:
                self._metrics[tenant.name].rejected("priority_not_allowed").inc()
                raise Forbidden(f"tenant {tenant.name!r} may not use priority class {asked!r}"
                                f" (allowed: {', '.join(tenant.priorities)})",
                                code="priority_not_allowed")
            level = wanted
        return tenant, Flow(tenant.name, level, tenant.weight)

    async def enter(self, client: Client, tokens: int) -> Grant:
        """Identify the request, take it from its tenant's limits (429 over one), and put
        the ``x-ratelimit-*`` headers on ``client`` for whatever answer it gets."""
        tenant, flow = self.identify(client.headers)
        client.record.tenant = tenant.name
        try:
            shared = self._shared
            if shared is not None and tenant.limited:
                held: Held = await shared.take(tenant, tokens)
            else:
                held = self._local.take(tenant.name, tokens)
        except RateLimited as exc:
            self._metrics[tenant.name].rejected(exc.reason).inc()
            raise
        if held.headers:
            client.answer_headers = held.headers
        return Grant(self, flow, held, client, tokens)
