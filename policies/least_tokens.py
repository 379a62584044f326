"""``least_tokens``: the backend with the fewest in-flight tokens (ties: fewest requests).

In-flight tokens are what pdlb dispatched to a backend and has not seen finish (prefill leg:
the prompt; decode leg: prompt + max_tokens, the KV the request may come to hold). The count
is exact and current at every pick, and it already includes every token dispatched since the
last ``/metrics`` scrape — the tokens a scrape-only policy would miss, sending a burst of
requests to the backend that looked idle a second ago.

What pdlb cannot see is load from elsewhere: other pdlb replicas or clients that talk to the
backends directly. Set ``kv_capacity_tokens`` (the backend's KV-cache size in tokens, e.g.
``num_gpu_blocks × block_size`` from vLLM's start-up log) and the cost becomes the larger of
pdlb's count and vLLM's own view: ``kv_cache_usage_perc × kv_capacity_tokens`` plus the
tokens pdlb dispatched since that sample (``tokens_since_scrape``). A sample older than
``max_scrape_age_s`` (the backend stopped answering /metrics) is ignored.

Options:

* ``kv_capacity_tokens`` (int ≥ 1, default unset): use scraped KV usage as above.
* ``max_scrape_age_s`` (number > 0, default 5.0): trust scraped samples up to this age.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from policies.base import (
    BackendView,
    RouteRequest,
    check_options,
    int_option,
    number_option,
)
from policies.load import rotating_min, token_key

NAME = "least_tokens"


class LeastTokens:
    """Fewest in-flight tokens; ties rotate so equal backends share load."""

    wants_prefix_hashes = False

    def __init__(self, options: Mapping[str, Any]) -> None:
        check_options(NAME, options, {"kv_capacity_tokens": int,
                                      "max_scrape_age_s": (int, float)})
        self.kv_capacity_tokens: int | None = None
        if "kv_capacity_tokens" in options:
            self.kv_capacity_tokens = int_option(NAME, options, "kv_capacity_tokens", 1,
                                                 minimum=1)
        self.max_scrape_age_s = number_option(NAME, options, "max_scrape_age_s", 5.0,
                                              minimum=1e-9)
        self._tiebreak = 0

    def cost(self, backend: BackendView) -> tuple[float, int]:
        """The backend's load in tokens (see the module docstring), then its requests."""
        tokens: float = backend.inflight_tokens
        capacity = self.kv_capacity_tokens
        load = backend.load
        if capacity is not None and load is not None and load.age_s <= self.max_scrape_age_s:
            tokens = max(tokens, load.kv_usage * capacity + backend.tokens_since_scrape)
        return tokens, backend.inflight_requests

    def pick(self, request: RouteRequest, candidates: Sequence[BackendView]) -> BackendView:
        self._tiebreak += 1
        if self.kv_capacity_tokens is None:
            return rotating_min(candidates, token_key, self._tiebreak)
        return rotating_min(candidates, self.cost, self._tiebreak)
