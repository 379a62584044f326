"""How pdlb asks a policy for a backend: one function for the pool and for the test fakes.

``lb.backends.pool.Pool.pick`` and :func:`policies.testing.simulate` both call
:func:`choose`, so a policy's unit tests see exactly the candidates and the checks it meets
in pdlb: only usable backends (healthy, under their token budget), minus the ones a retry
excludes, in the pool's configured order; the policy is asked even when one candidate is
left (stateful policies record every choice); a pick that is not one of the candidates is
refused.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol, TypeVar

from policies.base import BackendView, Policy, RouteRequest


class Candidate(BackendView, Protocol):
    """A backend as the pool holds it: a view that also knows whether it may be picked."""

    def usable(self) -> bool:
        """Healthy and under its own token budget."""
        ...


B = TypeVar("B", bound=Candidate)


class NoCandidate(LookupError):
    """Every backend is unusable or excluded: the policy was not asked."""


class NotACandidate(ValueError):
    """The policy returned something that is not one of the candidates it was given."""


def choose(policy: Policy, request: RouteRequest, backends: Sequence[B],
           exclude: Collection[B] = ()) -> B:
    """Ask ``policy`` for one of the usable ``backends`` not in ``exclude``."""
    candidates = [b for b in backends if b.usable() and b not in exclude]
    if not candidates:
        raise NoCandidate("no usable backend")
    picked = policy.pick(request, candidates)
    for backend in candidates:
        if backend is picked:
            return backend
    raise NotACandidate(f"policy returned {picked!r}, which is not one of the candidates")
