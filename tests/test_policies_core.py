"""The built-in policies and the registry's start-up checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from lb.backends.pool import Pool
from lb.config import parse_config
from lb.metrics import Metrics
from policies.base import BackendView, RouteRequest
from policies.least_tokens import LeastTokens
from policies.registry import PolicyLoadError, build_policy
from policies.round_robin import RoundRobin

REQ = RouteRequest(request_id="r", leg="prefill", endpoint="completions", model=None,
                   prompt_tokens=10, max_tokens=10, session_key=None)


def pool(n: int, policy: Any) -> Pool:
    cfg = parse_config({"pools": {
        "prefill": {"backends": [f"http://h{i}:1" for i in range(n)]},
        "decode": {"backends": ["http://d:1"]}}}, "<t>")
    return Pool(cfg.prefill, policy, Metrics())


def test_round_robin_cursor_is_shared_and_skips_unusable():
    p = pool(3, RoundRobin({}))
    assert [p.pick(REQ).index for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    p.backends[1].healthy = False
    assert [p.pick(REQ).index for _ in range(4)] == [0, 2, 0, 2]


def test_least_tokens_prefers_idle_and_leases_refund():
    p = pool(3, LeastTokens({}))
    with p.lease(p.backends[0], 500), p.lease(p.backends[2], 100):
        assert p.pick(REQ).index == 1
        with p.lease(p.backends[1], 1000):
            assert p.pick(REQ).index == 2
    assert all(b.inflight_tokens == 0 and b.inflight_requests == 0 for b in p.backends)
    assert p.inflight_tokens == 0


def test_backend_token_budget_takes_it_out_of_rotation():
    cfg = parse_config({"pools": {
        "prefill": {"backends": [{"url": "http://a:1", "max_inflight_tokens": 100},
                                 {"url": "http://b:1"}]},
        "decode": {"backends": ["http://d:1"]}}}, "<t>")
    p = Pool(cfg.prefill, RoundRobin({}), Metrics())
    with p.lease(p.backends[0], 100):
        assert {p.pick(REQ).index for _ in range(4)} == {1}


def test_registry_errors_name_the_problem():
    with pytest.raises(PolicyLoadError, match=r"available: .*least_tokens.*round_robin"):
        build_policy("nope", {}, pool="prefill")
    with pytest.raises(PolicyLoadError, match=r"^pools\.prefill\.policy_options\.x: unknown key"
                                              r" for policy 'round_robin' \(known here: none\)"):
        build_policy("round_robin", {"x": 1}, pool="prefill")


class Async:
    def __init__(self, options: Mapping[str, Any]) -> None:
        pass

    async def pick(self, request: RouteRequest, candidates: Sequence[BackendView]) -> BackendView:
        return candidates[0]


class NoPick:
    def __init__(self, options: Mapping[str, Any]) -> None:
        pass


class NoPrefixFlag:
    """Implements pick but does not say whether it reads prefix_hashes."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        pass

    def pick(self, request: RouteRequest, candidates: Sequence[BackendView]) -> BackendView:
        return candidates[0]


def test_registry_rejects_plugins_that_do_not_implement_the_interface(monkeypatch):
    import policies.registry as registry

    monkeypatch.setattr(registry, "BUILTINS", {**registry.BUILTINS,
                                               "async_one": f"{__name__}:Async",
                                               "no_pick": f"{__name__}:NoPick",
                                               "no_flag": f"{__name__}:NoPrefixFlag"})
    with pytest.raises(PolicyLoadError, match="must be synchronous"):
        build_policy("async_one", {}, pool="decode")
    with pytest.raises(PolicyLoadError, match="no pick"):
        build_policy("no_pick", {}, pool="decode")
    with pytest.raises(PolicyLoadError, match="no boolean wants_prefix_hashes attribute"):
        build_policy("no_flag", {}, pool="decode")
