"""``least_kv_usage``: the backend whose KV cache is least full, by vLLM's own account.

vLLM reports ``vllm:kv_cache_usage_perc`` on /metrics; pdlb scrapes it every second or so
into ``backend.load``. A scrape is up to a second old, and every request pdlb sends in that
second lands on the backend that looked emptiest — so the estimate adds what pdlb has sent
since the sample (``backend.tokens_since_scrape``) as a fraction of the KV capacity. A
backend with no sample yet (or a stale one) is judged by pdlb's in-flight tokens instead.

Options (``[pools.decode.policy_options]``):

* ``kv_capacity_tokens`` (int, default 400000): the backends' KV-cache size in tokens.
* ``max_scrape_age_s`` (number, default 5.0): older samples are not trusted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from policies.base import BackendView, RouteRequest, check_options, int_option, number_option

NAME = "least_kv_usage"


class LeastKVUsage:
    wants_prefix_hashes = False  # it never reads request.prefix_hashes: pdlb skips hashing

    def __init__(self, options: Mapping[str, Any]) -> None:
        check_options(NAME, options, {"kv_capacity_tokens": int,
                                      "max_scrape_age_s": (int, float)})
        self.capacity = int_option(NAME, options, "kv_capacity_tokens", 400_000, minimum=1)
        self.max_age_s = number_option(NAME, options, "max_scrape_age_s", 5.0, minimum=0.001)

    def usage(self, backend: BackendView) -> float:
        """Estimated KV usage, 0..1 (may pass 1 when pdlb over-commits)."""
        load = backend.load
        if load is None or load.age_s > self.max_age_s:
            return backend.inflight_tokens / self.capacity
        return load.kv_usage + backend.tokens_since_scrape / self.capacity

    def pick(self, request: RouteRequest, candidates: Sequence[BackendView]) -> BackendView:
        return min(candidates, key=lambda b: (self.usage(b), b.inflight_tokens))
