"""The weighted score policy: each scorer, the weights, and the prefix/load trade-off."""

from __future__ import annotations

import pytest

from policies.base import PolicyOptionError, ScrapedLoad
from policies.score import Score
from policies.testing import backends, make_request, simulate

SYSTEM = "Answer in the voice of a patient librarian, citing sources where you can. " * 10


def test_load_only_is_least_tokens():
    """With only the load scorer, the least-loaded backend wins."""
    policy = Score({"weights": {"load": 1, "prefix": 0}})
    pool = backends(3)
    pool[0].inflight_tokens, pool[1].inflight_tokens, pool[2].inflight_tokens = 500, 100, 900
    assert policy.pick(make_request(prompt_tokens=100), pool) is pool[1]
    assert policy.scores(make_request(prompt_tokens=100), pool) == pytest.approx(
        [1 - 400 / 900, 1.0, 1 - 800 / 900])


def test_prefix_match_wins_until_the_load_gap_outweighs_it():
    """A backend holding the whole prompt keeps winning while its extra load is small, and
    loses once it is over the load filter's bound, however high the prefix weight."""
    policy = Score({})
    pool = backends(2)
    request = make_request(SYSTEM + "Which books on tea?", prompt_tokens=200)
    home = policy.pick(request, pool)
    other = pool[1 - home.index]
    home.inflight_tokens = 200
    assert policy.pick(request, pool) is home
    home.inflight_tokens = 200 * 20
    assert policy.pick(request, pool) is other
    greedy = Score({"weights": {"prefix": 100}})
    home = greedy.pick(request, pool := backends(2))
    home.inflight_tokens = 200 * 20
    assert greedy.pick(request, pool) is not home


def test_raising_the_load_weight_tightens_affinity():
    """The same gap that a default score tolerates sends the request away at load = 4."""
    request = make_request(SYSTEM + "Which books on tea?", prompt_tokens=200)
    results = {}
    for load_weight in (1, 4):
        policy = Score({"weights": {"load": load_weight}})
        pool = backends(2)
        home = policy.pick(request, pool)
        home.inflight_tokens = 400
        results[load_weight] = policy.pick(request, pool) is home
    assert results == {1: True, 4: False}


def test_kv_usage_and_queue_scorers_use_the_scrape():
    """kv_usage prefers free KV, queue prefers short waiting queues; stale or missing
    samples are neutral (the mean of the others)."""
    pool = backends(3)
    pool[0].load = ScrapedLoad(kv_usage=0.9, waiting=4)
    pool[1].load = ScrapedLoad(kv_usage=0.2, waiting=0)
    pool[2].load = ScrapedLoad(kv_usage=0.0, waiting=0, age_s=60)  # stale
    kv = Score({"weights": {"load": 0, "prefix": 0, "kv_usage": 1}})
    assert kv.scores(make_request(), pool) == pytest.approx([0.1, 0.8, 0.45])
    assert kv.pick(make_request(), pool) is pool[1]
    queue = Score({"weights": {"load": 0, "prefix": 0, "queue": 1}})
    assert queue.scores(make_request(), pool) == pytest.approx([0.2, 1.0, 0.6])
    pool[0].load = pool[1].load = None
    assert queue.scores(make_request(), pool) == [0.0, 0.0, 0.0]


def test_prefix_hashes_only_wanted_when_prefix_is_weighted():
    """pdlb computes prefix hashes only for a score policy that uses the prefix scorer."""
    assert Score({}).wants_prefix_hashes is True
    assert Score({"weights": {"prefix": 0}}).wants_prefix_hashes is False


def test_groups_stay_together_under_load():
    """Four shared-prefix groups on four backends with 16 in flight: most requests of a group
    land on one backend, and the load stays spread."""
    requests = [make_request(f"{g} " + SYSTEM + f"question {i}", prompt_tokens=300)
                for i in range(50) for g in range(4)]
    pool = backends(4)
    chosen = simulate(Score({}), requests, pool, concurrency=16)
    for g in range(4):
        group = chosen[g::4]
        assert max(group.count(b) for b in range(4)) >= 0.8 * len(group)
    assert min(b.picks for b in pool) >= 25


@pytest.mark.parametrize("weights, message", [
    ({"latency": 1}, r"weights\.latency: unknown key for policy 'score' \(known here: kv_usage,"),
    ({"load": -1}, r"weights\.load = -1: must be >= 0"),
    ({"load": "high"}, r"weights\.load = 'high': expected a number"),
    ({"load": 0, "prefix": 0}, r"weights = \{'load': 0, 'prefix': 0\}: give some scorer a weight"),
])
def test_bad_weights_are_named(weights, message):
    """Each bad weight is reported with the scorer's name."""
    with pytest.raises(PolicyOptionError, match=message):
        Score({"weights": weights})


def test_failed_leg_drops_the_prefix_record():
    """Like prefix_affinity, score forgets a prefix record when its leg fails."""
    policy = Score({})
    pool = backends(2)
    request = make_request(SYSTEM + "x", prompt_tokens=100)
    chosen = policy.pick(request, pool)
    assert policy.scores(request, pool)[chosen.index] > policy.scores(request, pool)[
        1 - chosen.index]
    policy.on_request_done(request, chosen, False, 0.2)
    assert policy.index.match(request.prefix_hashes) == {}
