"""prefix_affinity, session_affinity and their shared prefix index: affinity and load bounds."""

from __future__ import annotations

from policies.prefix_affinity import PrefixAffinity
from policies.prefix_index import PrefixIndex
from policies.session_affinity import SessionAffinity
from policies.testing import backends, make_request, simulate

SYSTEM = [f"You are assistant number {i}. Follow the house rules carefully. " * 8
          for i in range(4)]


def prompt(group: int, suffix: str) -> str:
    return SYSTEM[group] + suffix


def test_index_longest_match_and_holders():
    """The index reports, per backend, the longest remembered prefix; holders are capped."""
    index = PrefixIndex(max_entries=100, holders=2)
    index.record((1, 2, 3, 4), 0)
    index.record((1, 2, 9), 1)
    assert index.match((1, 2, 3, 4, 5)) == {0: 4, 1: 2}
    assert index.match((1, 2, 9, 7)) == {0: 2, 1: 3}
    assert index.match((8, 2, 3)) == {}
    index.record((1, 2), 2)  # a third holder pushes out the oldest of the shorter prefix
    assert index.match((1, 2)) == {2: 2, 1: 2}


def test_index_is_bounded_and_evicts_longest_prefixes_first():
    """Past max_entries the least recent entries go, longer prefixes before shorter ones,
    so a lookup that stops at the first unknown hash never misses a known shorter one."""
    index = PrefixIndex(max_entries=5, holders=1)
    index.record((1, 2, 3, 4), 0)
    index.record((10, 20, 30), 1)
    assert len(index) == 5
    assert index.match((1, 2, 3, 4)) == {0: 2}
    assert index.match((10, 20, 30)) == {1: 3}


def test_shared_prefix_follows_the_first_backend():
    """Prompts sharing a system prompt go where the first of them went; other groups spread."""
    requests = [make_request(prompt(g, f"Question {i}: what is {i} squared?"))
                for i in range(5) for g in range(4)]
    chosen = simulate(PrefixAffinity({}), requests, backends(4), concurrency=4)
    by_group: dict[int, set[int]] = {}
    for i, backend in enumerate(chosen):
        by_group.setdefault(i % 4, set()).add(backend)
    assert all(len(s) == 1 for s in by_group.values()), by_group
    assert len(set(chosen)) == 4  # four groups, four backends (new prefixes go least-loaded)


def test_chat_history_counts_not_just_the_first_message():
    """A follow-up turn matches the backend that got the earlier turn of the conversation,
    even when another conversation shares its system message."""
    system = {"role": "system", "content": SYSTEM[0]}
    turn1_a = [system, {"role": "user", "content": "Tell me about the history of tea. " * 4}]
    turn1_b = [system, {"role": "user", "content": "Explain how bicycles stay upright. " * 4}]
    turn2_a = [*turn1_a, {"role": "assistant", "content": "Tea began in China."},
               {"role": "user", "content": "And in England?"}]
    policy = PrefixAffinity({})
    pool = backends(2)
    a = policy.pick(make_request(messages=turn1_a), pool)
    a.inflight_tokens += 100
    b = policy.pick(make_request(messages=turn1_b), pool)  # system match, but a is busier
    b.inflight_tokens += 100
    assert policy.pick(make_request(messages=turn2_a), pool) is a


def test_hot_prefix_is_bounded_by_load():
    """A hot prefix's backend over load_factor × mean is passed over for the least-loaded
    one, which then also holds the prefix (holders), so later requests hit either."""
    policy = PrefixAffinity({"load_factor": 1.25, "load_slack_tokens": 0})
    pool = backends(4)
    hot = make_request(prompt(0, "hot question"), prompt_tokens=1000)
    first = policy.pick(hot, pool)
    for b in pool:
        b.inflight_tokens = 1000
    first.inflight_tokens = 1300  # mean 1075, bound 1343.75: still within
    assert policy.pick(hot, pool) is first
    first.inflight_tokens = 1400  # mean 1100, bound 1375: over
    spill = policy.pick(hot, pool)
    assert spill is not first
    first.inflight_tokens = 1000
    spill.inflight_tokens = 1000
    assert {policy.pick(hot, pool).index for _ in range(3)} <= {first.index, spill.index}


def peak_imbalance(policy: PrefixAffinity, tokens: int, inflight: int) -> float:
    """Route 400 requests of one hot prefix with ``inflight`` in flight (oldest finishes
    first); return the highest max/mean in-flight tokens seen at full concurrency."""
    pool = backends(4)
    running: list[tuple[int, int]] = []
    peak = 0.0
    for i in range(400):
        b = policy.pick(make_request(prompt(0, f"q{i}"), prompt_tokens=tokens), pool)
        b.inflight_tokens += tokens
        running.append((b.index, tokens))
        if len(running) > inflight:
            index, done = running.pop(0)
            pool[index].inflight_tokens -= done
        if len(running) == inflight:
            mean = sum(x.inflight_tokens for x in pool) / 4
            peak = max(peak, max(x.inflight_tokens for x in pool) / mean)
    return peak


def test_under_sustained_hot_load_no_backend_exceeds_the_bound():
    """All traffic on one prefix, 32 × 500 tokens in flight (mean 4000 per backend): the
    busiest backend never passes the bound by more than the request it just got."""
    per_request = 500 / 4000
    strict = peak_imbalance(PrefixAffinity({"load_slack_tokens": 0}), 500, 32)
    assert 1.0 < strict <= 1.25 + per_request, strict
    default = peak_imbalance(PrefixAffinity({}), 500, 32)  # slack = one request
    assert default <= 1.25 + 2 * per_request, default


def test_slack_keeps_affinity_at_low_load():
    """The default slack (the request's size) keeps a prefix on its backend with one request
    in flight; load_slack_tokens = 0 moves it to an idle backend."""
    request = make_request(prompt(1, "x"), prompt_tokens=1000)
    for options, stays in (({}, True), ({"load_slack_tokens": 0}, False)):
        policy = PrefixAffinity(options)
        pool = backends(4)
        first = policy.pick(request, pool)
        first.inflight_tokens = 1000
        assert (policy.pick(request, pool) is first) == stays


def test_min_match_blocks_ignores_short_matches():
    """A match shorter than min_match_blocks is treated as no match (least-loaded)."""
    policy = PrefixAffinity({"min_match_blocks": 10})
    pool = backends(2)
    first = policy.pick(make_request(SYSTEM[0][:200] + "a" * 600), pool)
    first.inflight_tokens = 10
    # Shares 3 blocks (192 bytes) only: goes to the idle backend.
    assert policy.pick(make_request(SYSTEM[0][:200] + "b" * 600), pool) is not first


def test_prompt_without_hashes_goes_least_loaded():
    """Short prompts (under one block) have no hashes: least-loaded, nothing recorded."""
    policy = PrefixAffinity({})
    pool = backends(3)
    pool[0].inflight_tokens, pool[2].inflight_tokens = 50, 50
    assert policy.pick(make_request("hi"), pool) is pool[1]
    assert len(policy.index) == 0


def test_session_sticks_then_moves_when_overloaded():
    """A session stays on its backend, moves when it is over the bound, and stays moved."""
    policy = SessionAffinity({})
    pool = backends(3)
    req = make_request(prompt_tokens=100, session_key="alice")
    home = policy.pick(req, pool)
    home.inflight_tokens = 100
    assert all(policy.pick(req, pool) is home for _ in range(3))
    home.inflight_tokens = 10_000
    moved = policy.pick(req, pool)
    assert moved is not home
    home.inflight_tokens = 0
    assert policy.pick(req, pool) is moved


def test_session_from_custom_header_and_without_key():
    """The header option picks the key; requests without one go least-loaded."""
    policy = SessionAffinity({"header": "X-Tenant"})
    pool = backends(2)
    tenant = make_request(prompt_tokens=10, headers={"x-tenant": "t1"}, session_key="ignored")
    home = policy.pick(tenant, pool)
    home.inflight_tokens = 5
    assert policy.pick(tenant, pool) is home
    assert policy.pick(make_request(prompt_tokens=10), pool) is not home


def test_sessions_are_bounded():
    """Past max_sessions the least recently seen session is forgotten."""
    policy = SessionAffinity({"max_sessions": 2})
    pool = backends(2)
    for key in ("a", "b", "c"):
        policy.pick(make_request(session_key=key), pool)
    assert list(policy._sessions) == ["b", "c"]


def test_session_whose_backend_left_the_candidates_moves():
    """If the session's backend is unhealthy the session moves to a candidate."""
    policy = SessionAffinity({})
    pool = backends(2)
    req = make_request(session_key="s")
    home = policy.pick(req, pool)
    others = [b for b in pool if b is not home]
    assert policy.pick(req, others) is others[0]


def test_failed_leg_drops_the_prefix_record():
    """on_request_done(ok=False) forgets that the backend holds the prefix (it may have
    cached nothing); a success keeps it; other holders are untouched."""
    policy = PrefixAffinity({"holders": 2})
    pool = backends(2)
    request = make_request(prompt(2, "a question"), prompt_tokens=100)
    first = policy.pick(request, pool)
    other = pool[1 - first.index]
    policy.index.record(request.prefix_hashes[:4], other.index)
    policy.on_request_done(request, first, True, 0.1)
    assert set(policy.index.match(request.prefix_hashes)) == {first.index, other.index}
    policy.on_request_done(request, first, False, 0.1)
    assert policy.index.match(request.prefix_hashes) == {other.index: 4}


def test_simulate_drives_the_hook():
    """Through policies.testing.simulate (which calls on_request_done), nothing is dropped
    when every leg succeeds."""
    policy = PrefixAffinity({})
    requests = [make_request(prompt(3, f"q{i}"), prompt_tokens=100) for i in range(8)]
    chosen = simulate(policy, requests, backends(3), concurrency=1)
    assert len(set(chosen)) == 1 and len(policy.index) > 0
