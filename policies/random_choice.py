"""``random``: a uniformly random candidate (module not named ``random``: no stdlib clash).

Options: ``seed`` (int, default unset = seeded from the OS) for reproducible tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from policies.base import BackendView, RouteRequest, check_options, seeded_rng

NAME = "random"


class RandomChoice:
    """Stateless apart from its own generator (never the module-global one)."""

    wants_prefix_hashes = False

    def __init__(self, options: Mapping[str, Any]) -> None:
        check_options(NAME, options, {"seed": int})
        self._rng = seeded_rng(options)

    def pick(self, request: RouteRequest, candidates: Sequence[BackendView]) -> BackendView:
        return candidates[self._rng.randrange(len(candidates))]
