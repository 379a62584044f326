"""``least_tokens``: the backend with the fewest in-flight tokens (ties: fewest requests)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from policies.base import BackendView, RouteRequest, check_options


class LeastTokens:
    """In-flight tokens are what pdlb dispatched and has not seen finish, so the count is
    current at every pick, unlike a scraped metric. Ties rotate so equal backends share load."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        check_options("least_tokens", options, {})
        self._tiebreak = 0

    def pick(self, request: RouteRequest, candidates: Sequence[BackendView]) -> BackendView:
        self._tiebreak += 1
        n = len(candidates)
        start = self._tiebreak % n
        best = candidates[start]
        best_key = (best.inflight_tokens, best.inflight_requests)
        for i in range(1, n):
            backend = candidates[(start + i) % n]
            key = (backend.inflight_tokens, backend.inflight_requests)
            if key < best_key:
                best, best_key = backend, key
        return best
