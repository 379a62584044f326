"""Unit tests for least_kv_usage, with pdlb's fakes: no server, no event loop."""

from __future__ import annotations

import pytest
from pdlb_policy_example import LeastKVUsage

from policies.base import PolicyOptionError, ScrapedLoad
from policies.testing import backends, make_request, simulate


def test_picks_the_emptiest_kv_cache():
    pool = backends(3)
    for b, usage in zip(pool, (0.7, 0.2, 0.5), strict=True):
        b.load = ScrapedLoad(kv_usage=usage)
    assert LeastKVUsage({}).pick(make_request(), pool) is pool[1]


def test_counts_tokens_sent_since_the_scrape():
    """Between scrapes the requests spread instead of all landing on one backend."""
    pool = backends(2, load=ScrapedLoad(kv_usage=0.1))
    chosen = simulate(LeastKVUsage({"kv_capacity_tokens": 10_000}),
                      [make_request(prompt_tokens=1000)] * 6, pool)
    assert sorted(chosen) == [0, 0, 0, 1, 1, 1]


def test_bad_option_is_named():
    with pytest.raises(PolicyOptionError,
                       match=r"policy_options\.kv_capacity_tokens = 0: must be >= 1"):
        LeastKVUsage({"kv_capacity_tokens": 0})
