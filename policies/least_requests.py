"""``least_requests``: the backend with the fewest in-flight requests (ties: fewest tokens).

Counts what pdlb dispatched and has not seen finish, current at every pick. Better than
``least_tokens`` only when request sizes are unknown or meaningless to the backend's cost;
with mixed prompt lengths prefer ``least_tokens``. No options.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from policies.base import BackendView, RouteRequest, check_options
from policies.load import rotating_min

NAME = "least_requests"


def _key(backend: BackendView) -> tuple[int, int]:
    return backend.inflight_requests, backend.inflight_tokens


class LeastRequests:
    """Fewest in-flight requests; ties rotate so equal backends share load."""

    wants_prefix_hashes = False

    def __init__(self, options: Mapping[str, Any]) -> None:
        check_options(NAME, options, {})
        self._turn = 0

    def pick(self, request: RouteRequest, candidates: Sequence[BackendView]) -> BackendView:
        self._turn += 1
        return rotating_min(candidates, _key, self._turn)
