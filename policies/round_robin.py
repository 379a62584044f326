"""``round_robin``: each pick takes the next backend in a cursor shared by all requests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from policies.base import BackendView, RouteRequest, check_options


class RoundRobin:
    """A single cursor for the pool's lifetime (never reset per request), over the configured
    order; backends that are not usable right now are skipped without losing the rotation."""

    wants_prefix_hashes = False

    def __init__(self, options: Mapping[str, Any]) -> None:
        check_options("round_robin", options, {})
        self._cursor = 0

    def pick(self, request: RouteRequest, candidates: Sequence[BackendView]) -> BackendView:
        # Choose the first candidate at or after the cursor, by configured index.
        cursor = self._cursor
        best = candidates[0]
        best_distance = -1
        for backend in candidates:
            distance = backend.index - cursor
            if distance < 0:
                distance += 1 << 30
            if best_distance < 0 or distance < best_distance:
                best, best_distance = backend, distance
        self._cursor = best.index + 1
        return best
