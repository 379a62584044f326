"""``power_of_two``: two candidates at random, the one with fewer in-flight tokens wins.

"The power of two choices": nearly as balanced as ``least_tokens``, but no backend is the
obvious minimum that every pick agrees on, which matters when several pdlb replicas route
to the same backends without seeing each other's counts. Ties: fewer requests, then the
first drawn.

Options: ``seed`` (int, default unset = seeded from the OS) for reproducible tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from policies.base import BackendView, RouteRequest, check_options, seeded_rng
from policies.load import token_key

NAME = "power_of_two"


class PowerOfTwo:
    """Compares two distinct random candidates by (in-flight tokens, in-flight requests)."""

    wants_prefix_hashes = False

    def __init__(self, options: Mapping[str, Any]) -> None:
        check_options(NAME, options, {"seed": int})
        self._rng = seeded_rng(options)

    def pick(self, request: RouteRequest, candidates: Sequence[BackendView]) -> BackendView:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        first, second = self._rng.sample(range(n), 2)
        a, b = candidates[first], candidates[second]
        return b if token_key(b) < token_key(a) else a
