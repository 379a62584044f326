"""The smallest fleets that meet the SLO, their headroom and what binds them.

For a rate: the decode pool's size does not change TPOT's dependence on the prefill pool,
so the smallest ``n_d`` that meets TPOT, KV and link limits is found first, then the
smallest ``n_p`` that meets TTFT with it (TTFT includes one decode step). The colocated
count is searched on its own. Headroom: the largest rate (bisection) at which the same
fleet still meets the SLO, as a fraction above the asked rate; the binding constraint is
what fails first just above that rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from lb.planner.model import (
    COLOCATED,
    DECODE_ITL,
    DECODE_KV,
    KV_TRANSFER,
    PREFILL_COMPUTE,
    Model,
    Prediction,
)

DECODE_REASONS = (DECODE_ITL, DECODE_KV, KV_TRANSFER)
CAP = 16
"""Headroom is searched up to this multiple of the asked rate."""


@dataclass
class Plan:
    """The answer for one rate."""

    rate: float
    prefill: int | None
    decode: int | None
    colocated: int | None
    pd: Prediction | None
    co: Prediction | None
    headroom: float | None
    """Max rate this PD fleet meets the SLO at / rate - 1."""
    binding: str | None
    """What fails first as the rate grows past the headroom."""
    co_headroom: float | None = None

    @property
    def binding_pool(self) -> str | None:
        if self.binding is None:
            return None
        return "prefill" if self.binding == PREFILL_COMPUTE else "decode"

    @property
    def total(self) -> int | None:
        return None if self.prefill is None or self.decode is None else self.prefill + self.decode


def _decode_ok(p: Prediction) -> bool:
    return not any(r in p.failed for r in DECODE_REASONS)


def smallest_decode(model: Model, rate: float, limit: int) -> int | None:
    for n in range(1, limit + 1):
        if _decode_ok(model.disaggregated(rate, limit, n)):
            return n
    return None


def smallest_prefill(model: Model, rate: float, n_decode: int, limit: int) -> int | None:
    # the smallest stable count first (cheap), then walk up
    start = max(1, math.ceil(rate * model.workload.mean_uncached
                             / model.profile.prefill.saturated_tokens_per_s))
    for n in range(start, limit + 1):
        if model.disaggregated(rate, n, n_decode).ok:
            return n
    return None


def smallest_colocated(model: Model, rate: float, limit: int) -> int | None:
    for n in range(1, limit + 1):
        if model.colocated(rate, n).ok:
            return n
    return None


def max_rate(check: Callable[[float], bool], rate: float) -> float:
    """The largest rate (bisection between 0 and CAP x ``rate``) at which ``check(rate)``;
    inf when it still holds past CAP x ``rate``."""
    lo, hi = 0.0, rate
    while check(hi):
        lo, hi = hi, hi * 2
        if hi > rate * CAP:
            return math.inf  # meets the SLO at every rate tried: no binding constraint in sight
    for _ in range(12):
        mid = (lo + hi) / 2
        if check(mid):
            lo = mid
        else:
            hi = mid
    return lo


def plan(model: Model, rate: float, limit: int = 64) -> Plan:
    n_d = smallest_decode(model, rate, limit)
    n_p = smallest_prefill(model, rate, n_d, limit) if n_d is not None else None
    n_c = smallest_colocated(model, rate, limit * 2)
    pd = model.disaggregated(rate, n_p, n_d) if n_p and n_d else None
    co = model.colocated(rate, n_c) if n_c else None
    headroom = binding = co_headroom = None
    if n_p and n_d:
        top = max_rate(lambda r: r > 0 and model.disaggregated(r, n_p, n_d).ok, rate)
        headroom = top / rate - 1.0
        if math.isfinite(top):
            over = model.disaggregated(top * 1.02 + 1e-9, n_p, n_d)
            binding = _first(over.failed)
    if n_c:
        top_c = max_rate(lambda r: r > 0 and model.colocated(r, n_c).ok, rate)
        co_headroom = top_c / rate - 1.0
    return Plan(rate, n_p, n_d, n_c, pd, co, headroom, binding, co_headroom)


def _first(failed: list[str]) -> str | None:
    """The most specific reason: capacity limits before latency symptoms."""
    for reason in (KV_TRANSFER, DECODE_KV, DECODE_ITL, PREFILL_COMPUTE, COLOCATED):
        if reason in failed:
            return reason
    return failed[0] if failed else None
