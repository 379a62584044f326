"""The tenants' parts on their own: exact windows, the fair line's order (classes, aging,
shares, shedding), admission's order with tenants, config and identity errors. No sleeps:
windows take their clock as an argument, the line a clock function."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lb.admission import Admission
from lb.config import parse_config
from lb.errors import ConfigError, InvalidRequest, Overloaded
from lb.metrics import Metrics
from lb.tenants.fairqueue import FairQueue, Flow
from lb.tenants.gate import Forbidden, Tenants
from lb.tenants.limits import LocalLimits, RateLimited, duration
from lb.tenants.window import Window
from tests.conftest import make_config


def config(tenants: dict[str, Any], tenancy: dict[str, Any] | None = None,
           decode_budget: int | None = None, max_queue: int = 100) -> Any:
    decode: dict[str, Any] = {"max_queue": max_queue, "queue_timeout_s": 5.0}
    if decode_budget is not None:
        decode["max_inflight_tokens"] = decode_budget
    return make_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"], pools={"decode": decode},
                       tenants=tenants, tenancy=tenancy or {})


# -- the window --------------------------------------------------------------------------

def test_window_is_exact_over_any_interval() -> None:
    """At most `limit` in any span-long interval, at every arrival time tried, and the wait
    it names is exactly when the oldest entry leaves."""
    w = Window(3, 10.0)
    taken: list[float] = []
    t = 0.0
    while t < 60:
        if w.wait_s(1, t) == 0:
            w.take(1, t)
            taken.append(t)
        else:
            oldest = taken[-3]
            assert w.wait_s(1, t) == pytest.approx(oldest + 10.0 - t)
        t += 0.7
    for start in taken:
        assert sum(1 for x in taken if start <= x < start + 10.0) <= 3
    assert len(taken) >= 3 * 6 - 3  # and it is not stricter than the limit


def test_window_tokens_wait_and_true_up() -> None:
    w = Window(100, 60.0)
    e1 = w.take(60, 0.0)
    w.take(30, 10.0)
    assert w.wait_s(20, 11.0) == pytest.approx(49.0)  # needs e1 gone: at 60
    w.resize(e1, 10, 12.0)  # the request used 10, not 60
    assert w.used(12.0) == 40 and w.wait_s(20, 12.0) == 0
    assert w.wait_s(101, 12.0) == float("inf")
    w.resize(e1, 99, 61.0)  # gone from the window: nothing changes
    assert w.used(61.0) == 30
    assert w.reset_s(61.0) == pytest.approx(9.0)


def test_duration_format() -> None:
    assert [duration(s) for s in (0.25, 1.0, 1.5, 59.9991, 360.0, 61.2)] == [
        "250ms", "1s", "1.5s", "60s", "6m0s", "1m2s"]


def test_local_limits_requests_tokens_concurrent() -> None:
    """Each limit refuses with its reason and a Retry-After from the window; a refused
    request takes nothing."""
    c = config({"t": {"requests": 2, "requests_window_s": 100, "tokens": 1000,
                      "concurrent": 2}})
    limits = LocalLimits(c.tenancy.tenants)
    a = limits.take("t", 400)
    assert a.headers["x-ratelimit-remaining-requests"] == "1"
    assert a.headers["x-ratelimit-remaining-tokens"] == "600"
    with pytest.raises(RateLimited) as info:
        limits.take("t", 700)
    assert info.value.reason == "tokens" and info.value.status == 429
    assert int(info.value.headers()["Retry-After"]) >= 59
    limits.take("t", 100)
    with pytest.raises(RateLimited) as info:
        limits.take("t", 1)
    assert info.value.reason == "concurrent"
    a.finish(50)
    with pytest.raises(RateLimited) as info:
        limits.take("t", 1)
    assert info.value.reason == "requests"
    assert 99 <= int(info.value.headers()["Retry-After"]) <= 100
    with pytest.raises(RateLimited) as info:
        limits.take("t", 1001)  # never fits
    assert info.value.reason == "tokens"
    assert limits.take("other", 10**9).headers == {}  # not a limited tenant


# -- the line ----------------------------------------------------------------------------

class W:
    def __init__(self, flow: Flow, tokens: int, name: str) -> None:
        self.need = {"prefill": 0, "decode": tokens}
        self.blocked_on = "decode"
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.flow: Flow | None = flow
        self.name = name


def drain(q: FairQueue[W]) -> list[str]:
    out = []
    while q:
        q[0]
        out.append(q.popleft().name)
    return out


async def test_fair_line_shares_by_tokens_and_weight() -> None:
    """A flood of 8 from `big` then 2 from `small`: small's are admitted 2nd and 4th, not
    last; with weight 3, `heavy` gets 3 requests per `light` one."""
    q: FairQueue[W] = FairQueue(2, 5.0)
    for i in range(8):
        q.append(W(Flow("big"), 100, f"b{i}"))
    for i in range(2):
        q.append(W(Flow("small"), 100, f"s{i}"))
    assert drain(q)[:5] == ["b0", "s0", "b1", "s1", "b2"]
    q = FairQueue(2, 5.0)
    for i in range(8):
        q.append(W(Flow("heavy", weight=3.0), 100, f"h{i}"))
        q.append(W(Flow("light"), 100, f"l{i}"))
    assert drain(q)[:8] == ["h0", "l0", "h1", "h2", "h3", "l1", "h4", "h5"]
    q = FairQueue(2, 5.0)  # by tokens, not requests: one 400-token request = four of 100
    q.append(W(Flow("a"), 400, "a0"))
    q.append(W(Flow("a"), 400, "a1"))
    for i in range(5):
        q.append(W(Flow("b"), 100, f"b{i}"))
    assert drain(q) == ["a0", "b0", "b1", "b2", "b3", "a1", "b4"]


async def test_classes_first_then_aging_bounds_the_wait() -> None:
    """Interactive goes before batch; a batch head that has waited aging_s competes as
    interactive and, having arrived first, goes first."""
    now = [0.0]
    q: FairQueue[W] = FairQueue(2, 5.0, clock=lambda: now[0])
    q.append(W(Flow("b", level=1), 100, "batch0"))
    q.append(W(Flow("b", level=1), 100, "batch1"))
    now[0] = 1.0
    q.append(W(Flow("i", level=0), 100, "inter0"))
    q.append(W(Flow("i", level=0), 100, "inter1"))
    assert q[0].name == "inter0"
    q.popleft()
    now[0] = 5.0  # batch0 has waited aging_s: level 0, arrived before inter1
    assert q[0].name == "batch0"
    q.popleft()
    now[0] = 5.5  # batch1 arrived at 0 too: it has also waited 5 s
    assert q[0].name == "batch1"
    q.popleft()
    q.append(W(Flow("b", level=1), 100, "batch2"))  # new, not aged
    assert drain(q) == ["inter1", "batch2"]


async def test_victims_lower_class_then_over_share_tenant() -> None:
    q: FairQueue[W] = FairQueue(2, 5.0)
    big = [W(Flow("big"), 100, f"b{i}") for i in range(4)]
    low = W(Flow("low", level=1), 100, "low")
    for w in [*big, low]:
        q.append(w)
    v = q.victim(Flow("small"), "decode")
    assert v is low  # a lower class first
    q.remove(low)
    v = q.victim(Flow("small"), "decode")
    assert v is big[3]  # then the newest of the tenant over its share
    q.remove(big[3])
    assert q.victim(Flow("big"), "decode") is None  # big may not push itself out
    assert q.victim(Flow("low", level=1), "decode") is None  # nor a lower class anyone
    assert len(q) == 3 and q[-1] is big[2]


async def test_admission_order_and_shedding_with_tenants() -> None:
    """Through Admission: one request fits at a time; 6 waiting of `big` then 1 of `small`:
    small is admitted second. A full line sheds big's newest (429 shed) for small."""
    c = config({"big": {}, "small": {}}, decode_budget=100, max_queue=4)
    a = Admission(c.pools, Metrics(), None, c.tenancy)
    first = await a.admit(0, 100, Flow("big"))
    order: list[str] = []

    async def one(name: str, flow: Flow) -> str:
        try:
            with await a.admit(0, 100, flow):
                order.append(name)
                await asyncio.sleep(0)
            return "ok"
        except Overloaded as exc:
            return exc.reason

    tasks = [asyncio.create_task(one(f"b{i}", Flow("big"))) for i in range(4)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(one("s0", Flow("small"))))  # line full: sheds b3
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(one("b4", Flow("big"))))  # full, nobody to shed
    await asyncio.sleep(0)
    first.release()
    results = await asyncio.gather(*tasks)
    assert results == ["ok", "ok", "ok", "shed", "ok", "queue_full"]
    assert order == ["b0", "s0", "b1", "b2"]
    assert a.admitted_tokens("decode") == 0


async def test_no_tenants_keeps_the_fifo_deque() -> None:
    c = config({})
    assert not c.tenancy.enabled
    a = Admission(c.pools, Metrics(), None, c.tenancy)
    assert type(a._queue).__name__ == "deque"


# -- config and identity -----------------------------------------------------------------

@pytest.mark.parametrize(("tenants", "tenancy", "needle"), [
    ({"a": {"priority": "urgent"}}, None, "tenants.a.priority"),
    ({"a": {"priorities": ["batch", "gold"]}}, None, "'gold' is not a class"),
    ({"a": {"requests": 0}}, None, "tenants.a.requests"),
    ({"a": {"tokens_per_min": 5}}, None, "unknown key"),
    ({"a": {"api_keys": ["k"]}, "b": {"api_keys": ["k"]}}, None, "also tenant 'a'"),
    ({"bad name": {}}, None, "tenant name"),
    ({"a": {}}, {"classes": []}, "tenancy.classes"),
    ({"a": {}}, {"header": "no spaces"}, "tenancy.header"),
])
def test_config_errors_name_the_key(tenants: Any, tenancy: Any, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(tenants, tenancy)
    assert needle in str(info.value)
    assert "'k'" not in str(info.value)  # keys are never echoed


def test_tenant_keys_are_client_keys_when_auth_is_on() -> None:
    c = parse_config({"pools": {"prefill": {"backends": [{"url": "http://127.0.0.1:1"}]},
                                "decode": {"backends": [{"url": "http://127.0.0.1:2"}]}},
                      "auth": {"api_keys": ["admin-key"]},
                      "tenants": {"a": {"api_keys": ["ka"]}}}, "<test>")
    assert c.auth.api_keys == ("admin-key", "ka")


async def test_identity_key_header_anonymous_and_priority() -> None:
    c = config({"a": {"api_keys": ["ka"], "priorities": ["interactive", "batch"]},
                "b": {"priority": "batch"}}, {"header": "X-Tenant"})
    t = Tenants(c.tenancy, Metrics())
    assert t.identify({"authorization": "Bearer ka"})[1] == Flow("a", 0, 1.0)
    assert t.identify({"authorization": "Bearer ka", "x-priority": "batch"})[1].level == 1
    assert t.identify({"x-tenant": "b"})[1] == Flow("b", 1, 1.0)
    assert t.identify({"x-tenant": "nobody"})[1].tenant == "anonymous"
    assert t.identify({"authorization": "Bearer wrong"})[1].tenant == "anonymous"
    assert t.identify({"x-tenant": "b", "x-priority": "batch"})[1].level == 1  # its own
    with pytest.raises(Forbidden) as info:
        t.identify({"x-tenant": "b", "x-priority": "interactive"})
    assert info.value.status == 403 and info.value.code == "priority_not_allowed"
    with pytest.raises(InvalidRequest) as bad:
        t.identify({"x-priority": "urgent"})
    assert bad.value.status == 400 and bad.value.code == "invalid_priority"


def test_workers_divide_tenant_limits_unless_redis_holds_them() -> None:
    """``--workers 3``: each worker enforces a third (rounded up); with [cluster] the whole."""
    from lb.serve.workers import share
    c = config({"a": {"requests": 10, "tokens": 1000, "concurrent": 4}, "b": {}})
    t = share(c, 3).tenancy.tenants
    assert (t["a"].requests, t["a"].tokens, t["a"].concurrent) == (4, 334, 2)
    assert t["b"].requests is None
    clustered = make_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"],
                            cluster={"redis_url": "redis://127.0.0.1:1/0"},
                            tenants={"a": {"requests": 10}})
    assert share(clustered, 3).tenancy.tenants["a"].requests == 10
