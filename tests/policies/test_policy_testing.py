"""The fakes shipped for plugin authors (policies.testing) behave like pdlb."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from lb.prefix import prefix_hashes
from policies.base import BackendView, RouteRequest
from policies.choose import NoCandidate, NotACandidate, choose
from policies.least_tokens import LeastTokens
from policies.testing import FakeBackend, backends, make_request, simulate


def test_fake_backend_is_a_backend_view():
    """FakeBackend satisfies the BackendView protocol and gets a URL from its index."""
    b = FakeBackend(index=3)
    assert isinstance(b, BackendView) and b.url == "http://fake-3:8000"


def test_make_request_hashes_like_pdlb():
    """make_request computes pdlb's own prefix hashes for completions and chat."""
    text = "shared system prompt " * 20
    assert make_request(text).prefix_hashes == prefix_hashes("completions", {"prompt": text})
    messages = [{"role": "system", "content": text}, {"role": "user", "content": "hi"}]
    chat = make_request(messages=messages, leg="decode", session_key="s")
    assert chat.prefix_hashes == prefix_hashes("chat", {"messages": messages})
    assert (chat.endpoint, chat.leg, chat.session_key) == ("chat", "decode", "s")
    assert make_request(prompt_tokens=5).prefix_hashes == ()
    with pytest.raises(ValueError, match="not both"):
        make_request("a", messages=messages)


class Recorder:
    def __init__(self) -> None:
        self.done: list[tuple[str, int, bool]] = []
        self.seen: list[int] = []

    def pick(self, request: RouteRequest, candidates: Sequence[BackendView]) -> BackendView:
        self.seen.append(len(candidates))
        return candidates[-1]

    def on_request_done(
        self, request: RouteRequest, backend: BackendView, ok: bool, duration_s: float
    ) -> None:
        self.done.append((request.request_id, backend.index, ok))


def test_simulate_charges_refunds_and_calls_hooks():
    """simulate charges each pick, finishes the oldest past the concurrency (calling
    on_request_done), skips unusable backends, and leaves the pool idle."""
    pool = backends(3)
    pool[2].max_inflight_tokens = 100
    policy = Recorder()
    requests = [make_request(prompt_tokens=100, request_id=f"r{i}") for i in range(4)]
    assert simulate(policy, requests, pool, concurrency=2) == [2, 1, 1, 2]
    assert policy.seen == [3, 2, 2, 3]
    assert policy.done == [("r0", 2, True), ("r1", 1, True), ("r2", 1, True), ("r3", 2, True)]
    assert all(b.inflight_tokens == 0 and b.inflight_requests == 0 for b in pool)
    assert [b.picks for b in pool] == [0, 2, 2]


def test_simulate_decode_leg_charges_prompt_and_max_tokens():
    """A decode leg charges prompt + max_tokens, like pdlb's decode lease."""
    requests = [make_request(prompt_tokens=100, max_tokens=900, leg="decode"),
                make_request(prompt_tokens=500, leg="decode", max_tokens=0)]
    peak: list[int] = []

    class Spy(LeastTokens):
        def pick(self, request, candidates):
            peak.append(sum(b.inflight_tokens for b in candidates))
            return super().pick(request, candidates)

    simulate(Spy({}), requests, backends(2))
    assert peak == [0, 1000]


def test_simulate_rejects_a_pick_outside_the_candidates():
    """A policy returning something that is not a candidate is an error, as in pdlb."""

    class Wrong:
        def pick(self, request, candidates):
            return FakeBackend(index=99)

    with pytest.raises(NotACandidate, match="not one of the candidates"):
        simulate(Wrong(), [make_request()], backends(2))


def test_simulate_asks_like_the_pool(monkeypatch):
    """simulate and lb's Pool.pick share policies.choose.choose: a lone candidate is still
    offered to the policy (stateful policies record it), and no usable backend raises."""
    import policies.testing

    calls: list[str] = []
    real = policies.testing.choose

    def spy(*args, **kwargs):
        calls.append("choose")
        return real(*args, **kwargs)

    monkeypatch.setattr(policies.testing, "choose", spy)
    pool = backends(2)
    pool[0].healthy = False
    recorder = Recorder()
    assert simulate(recorder, [make_request()], pool) == [1]
    assert recorder.seen == [1] and calls == ["choose"]
    pool[1].healthy = False
    with pytest.raises(NoCandidate):
        simulate(recorder, [make_request()], pool)


def test_pool_pick_goes_through_choose(monkeypatch):
    """The pool's pick is the same function (excluded backends are no candidates)."""
    import lb.backends.pool as pool_module
    from lb.config import config_from_flags
    from lb.metrics import Metrics

    seen: list[tuple[int, ...]] = []

    class Spy:
        wants_prefix_hashes = False

        def pick(self, request, candidates):
            seen.append(tuple(b.index for b in candidates))
            return candidates[0]

    config = config_from_flags(["http://a:1", "http://b:1", "http://c:1"], ["http://d:1"])
    pool = pool_module.Pool(config.prefill, Spy(), Metrics())
    assert pool_module.choose is choose
    pool.backends[1].healthy = False
    assert pool.pick(make_request(), exclude=[pool.backends[0]]) is pool.backends[2]
    assert seen == [(2,)]
