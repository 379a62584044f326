"""Each simple built-in policy's choice, with fake backends (policies.testing)."""

from __future__ import annotations

from collections import Counter

import pytest

from policies.base import ScrapedLoad
from policies.least_requests import LeastRequests
from policies.least_tokens import LeastTokens
from policies.power_of_two import PowerOfTwo
from policies.random_choice import RandomChoice
from policies.round_robin import RoundRobin
from policies.testing import backends, make_request, simulate

REQ = make_request(prompt_tokens=100)


def test_round_robin_rotates_one_global_cursor():
    """round_robin cycles over the pool with a cursor shared by all requests."""
    assert simulate(RoundRobin({}), [REQ] * 7, backends(3)) == [0, 1, 2, 0, 1, 2, 0]


def test_round_robin_skips_unhealthy_without_losing_its_place():
    """An unhealthy backend is skipped; the rotation resumes after it."""
    pool = backends(4)
    policy = RoundRobin({})
    assert simulate(policy, [REQ] * 2, pool) == [0, 1]
    pool[2].healthy = False
    assert simulate(policy, [REQ] * 4, pool) == [3, 0, 1, 3]


def test_random_is_reproducible_with_a_seed_and_covers_the_pool():
    """random with the same seed picks the same sequence; every backend gets picked."""
    a = simulate(RandomChoice({"seed": 7}), [REQ] * 200, backends(4), concurrency=1)
    b = simulate(RandomChoice({"seed": 7}), [REQ] * 200, backends(4), concurrency=1)
    assert a == b
    counts = Counter(a)
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 30


def test_least_requests_counts_requests_not_tokens():
    """least_requests prefers the backend with fewer requests even if they are large."""
    pool = backends(3)
    pool[0].inflight_requests, pool[0].inflight_tokens = 1, 10_000
    pool[1].inflight_requests, pool[1].inflight_tokens = 3, 30
    pool[2].inflight_requests, pool[2].inflight_tokens = 1, 20_000
    assert LeastRequests({}).pick(REQ, pool) is pool[0]


def test_least_requests_ties_rotate():
    """Idle backends take turns instead of the first always winning."""
    chosen = simulate(LeastRequests({}), [REQ] * 6, backends(3), concurrency=1)
    assert sorted(Counter(chosen).values()) == [2, 2, 2]


def test_least_tokens_balances_mixed_sizes():
    """least_tokens sends a small request next to a big one rather than onto two small ones."""
    pool = backends(2)
    pool[0].inflight_requests, pool[0].inflight_tokens = 1, 5_000
    pool[1].inflight_requests, pool[1].inflight_tokens = 2, 200
    assert LeastTokens({}).pick(REQ, pool) is pool[1]
    requests = [make_request(prompt_tokens=n) for n in (1000, 10, 10, 10, 10, 10)]
    first, *rest = simulate(LeastTokens({}), requests, backends(2))
    assert rest == [1 - first] * 5


def test_least_tokens_ignores_scrape_unless_capacity_given():
    """Without kv_capacity_tokens, scraped KV usage does not change the choice."""
    pool = backends(2)
    pool[0].load = ScrapedLoad(kv_usage=0.9)
    pool[1].inflight_tokens = 100
    assert LeastTokens({}).pick(REQ, pool) is pool[0]


def test_least_tokens_with_capacity_sees_load_pdlb_did_not_send():
    """With kv_capacity_tokens, vLLM's KV usage plus tokens sent since the scrape counts."""
    policy = LeastTokens({"kv_capacity_tokens": 100_000})
    pool = backends(2)
    pool[0].load = ScrapedLoad(kv_usage=0.5)  # 50k tokens from another client
    pool[1].inflight_tokens = 1_000
    pool[1].load = ScrapedLoad(kv_usage=0.01)
    assert policy.pick(REQ, pool) is pool[1]
    assert policy.cost(pool[0]) == (50_000, 0)
    # What pdlb dispatched since the sample is added to it ...
    pool[1].tokens_since_scrape = 60_000
    assert policy.cost(pool[1]) == (61_000, 0)
    assert policy.pick(REQ, pool) is pool[0]
    # ... and pdlb's own count is a floor when the sample lags behind it.
    pool[0].inflight_tokens = 70_000
    assert policy.cost(pool[0]) == (70_000, 0)


def test_least_tokens_ignores_stale_samples():
    """A sample older than max_scrape_age_s (backend not answering /metrics) is ignored."""
    policy = LeastTokens({"kv_capacity_tokens": 100_000, "max_scrape_age_s": 2})
    pool = backends(2)
    pool[0].load = ScrapedLoad(kv_usage=0.9, age_s=3.0)
    pool[1].inflight_tokens = 10
    assert policy.pick(REQ, pool) is pool[0]


def test_power_of_two_never_picks_the_worse_of_its_pair():
    """power_of_two only ever picks the less-loaded of two distinct backends: with one
    backend far busier than the rest it is never chosen, and the result is reproducible."""
    pool = backends(4)
    pool[3].inflight_tokens = 1_000_000
    policy = PowerOfTwo({"seed": 1})
    picks = [policy.pick(REQ, pool).index for _ in range(300)]
    assert 3 not in picks and set(picks) == {0, 1, 2}
    again = PowerOfTwo({"seed": 1})
    assert [again.pick(REQ, pool).index for _ in range(300)] == picks


def test_power_of_two_balances_under_load():
    """Routing 400 equal requests with 16 in flight keeps the backends within a few
    requests of each other."""
    pool = backends(4)
    simulate(PowerOfTwo({"seed": 3}), [REQ] * 400, pool, concurrency=16)
    counts = [b.picks for b in pool]
    assert max(counts) - min(counts) < 40, counts


@pytest.mark.parametrize("policy", [RoundRobin, RandomChoice, LeastRequests, LeastTokens,
                                    PowerOfTwo])
def test_single_candidate_is_returned(policy):
    """Every policy copes with one candidate (pdlb skips the call, plugins may not)."""
    pool = backends(1)
    assert policy({}).pick(REQ, pool) is pool[0]
