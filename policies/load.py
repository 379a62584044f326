"""Load measures and choices shared by the built-in policies.

"Load" here is pdlb's own in-flight token count: what pdlb dispatched to a backend and has
not seen finish. It is exact and current at every pick (a scraped vLLM metric is up to one
scrape interval old), so it is what the load bounds and the least-loaded fallbacks use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from policies.base import BackendView, RouteRequest

B = TypeVar("B", bound=BackendView)


def mean_tokens(candidates: Sequence[BackendView]) -> float:
    """The candidates' mean in-flight tokens."""
    return sum(b.inflight_tokens for b in candidates) / len(candidates)


def request_tokens(request: RouteRequest) -> int:
    """The tokens this leg will charge its backend: the prompt; for decode also max_tokens."""
    return request.prompt_tokens + (request.max_tokens if request.leg == "decode" else 0)


def load_limit(
    request: RouteRequest, candidates: Sequence[BackendView], factor: float,
    slack_tokens: int | None,
) -> float:
    """In-flight tokens above which a backend counts as overloaded for this request:
    ``factor × mean + slack``, the slack defaulting to the request's own tokens (so at low
    load one request in flight does not make a backend "overloaded")."""
    slack = request_tokens(request) if slack_tokens is None else slack_tokens
    return factor * mean_tokens(candidates) + slack


def token_key(backend: BackendView) -> tuple[int, int]:
    return backend.inflight_tokens, backend.inflight_requests


def rotating_min(
    candidates: Sequence[B], key: Callable[[B], tuple[float, ...]], turn: int
) -> B:
    """The candidate with the smallest key; ties go to the first one at or after ``turn``
    (mod the count), so equal backends take turns instead of the first always winning."""
    n = len(candidates)
    start = turn % n
    best = candidates[start]
    best_key = key(best)
    for i in range(1, n):
        backend = candidates[(start + i) % n]
        k = key(backend)
        if k < best_key:
            best, best_key = backend, k
    return best


def least_loaded(candidates: Sequence[B], turn: int) -> B:
    """Fewest in-flight tokens, then fewest requests, ties rotating with ``turn``."""
    return rotating_min(candidates, token_key, turn)
