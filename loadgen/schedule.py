"""Arrival schedules: absolute send offsets (seconds from time zero), computed up front.

Sending at ``t0 + offset[i]`` (never "sleep one interval after the last send") means a late
send does not shift the sends after it; a relative sleep adds every late wake-up to all later
sends, so the rate drifts below the target (vLLM's client had this drift until it switched to
an absolute schedule: vllm-project/vllm#21104, #21108; not measured here). Whether sends
keep up is measured per run (``schedule_lag_ms``, ``fell_behind``); the rates one process
kept up with on a 2-core VM are in docs/loadgen.md.

- ``poisson``: exponential gaps, mean 1/rate (gamma with burstiness 1).
- ``gamma``: gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)); the gaps' coefficient
  of variation is 1/sqrt(burstiness): < 1 burstier than Poisson, > 1 smoother.
- ``constant``: evenly spaced (the burstiness → infinity limit).
- ramps: the rate changes linearly from ``rate`` to ``ramp_to`` over the run; arrivals are
  drawn in "operational time" and mapped back through the integrated rate (exact
  time-rescaling of a non-homogeneous renewal process).
- traces: offsets given by the workload's timestamps, optionally scaled.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

ARRIVALS = ("poisson", "gamma", "constant")

# Safety valve: a schedule this long would not fit in memory comfortably.
MAX_SCHEDULED = 50_000_000


@dataclass(frozen=True, slots=True)
class ArrivalSpec:
    """What the open-loop schedule should look like."""

    rate: float
    arrival: str = "poisson"
    burstiness: float = 1.0
    ramp_to: float | None = None

    def __post_init__(self) -> None:
        if self.arrival not in ARRIVALS:
            raise ValueError(f"unknown arrival {self.arrival!r}; choose one of {ARRIVALS}")
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive number of requests/s, got {self.rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.ramp_to is not None and not self.ramp_to > 0:
            raise ValueError(f"ramp end rate must be > 0, got {self.ramp_to}")


def _unit_gap(rng: random.Random, spec: ArrivalSpec) -> float:
    """One inter-arrival gap of a mean-1 process of the spec's shape."""
    if spec.arrival == "constant" or math.isinf(spec.burstiness):
        return 1.0
    if spec.arrival == "poisson" and spec.burstiness == 1.0:
        return rng.expovariate(1.0)
    return rng.gammavariate(spec.burstiness, 1.0 / spec.burstiness)


def open_loop(
    spec: ArrivalSpec,
    *,
    duration_s: float | None = None,
    num_requests: int | None = None,
    seed: int = 0,
) -> list[float]:
    """Send offsets for an open-loop run, bounded by a duration, a count, or both.

    The first request goes at offset 0 (constant) or after one random gap (poisson/gamma,
    so that the process is stationary from t=0). A ramp needs a duration or a count to
    know its length; with only a count, the length is 2N / (start + end).
    """
    if duration_s is None and num_requests is None:
        raise ValueError("an open-loop schedule needs a duration, a number of requests, or both")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration must be > 0 s, got {duration_s}")
    if num_requests is not None and num_requests < 0:
        raise ValueError(f"number of requests must be >= 0, got {num_requests}")
    rng = random.Random(seed)
    a = spec.rate
    b = spec.ramp_to if spec.ramp_to is not None else a
    length = duration_s if duration_s is not None else 2.0 * (num_requests or 0) / (a + b)
    expected = (a + b) / 2.0 * length
    if expected > MAX_SCHEDULED or (num_requests or 0) > MAX_SCHEDULED:
        raise ValueError(f"schedule too long (~{expected:.0f} requests); split the run")

    def to_time(op: float) -> float:
        # Invert the integrated rate Λ(t) = a t + (b - a) t² / (2 L).
        if a == b or length <= 0:
            return op / a
        k = (b - a) / (2.0 * length)
        return (-a + math.sqrt(a * a + 4.0 * k * op)) / (2.0 * k)

    offsets: list[float] = []
    op = 0.0 if spec.arrival == "constant" else _unit_gap(rng, spec)
    limit_op = a * length + (b - a) * length / 2.0 if duration_s is not None else math.inf
    while op < limit_op - 1e-12 and (num_requests is None or len(offsets) < num_requests):
        offsets.append(to_time(op))
        op += _unit_gap(rng, spec)
    return offsets


def from_timestamps(timestamps: Sequence[float | None], time_scale: float = 1.0) -> list[float]:
    """Trace replay: offsets from the first timestamp, divided by ``time_scale``.

    ``time_scale`` 2 replays twice as fast. Timestamps must not decrease.
    """
    if not time_scale > 0:
        raise ValueError(f"time scale must be > 0, got {time_scale}")
    if any(t is None for t in timestamps):
        raise ValueError("trace replay needs a timestamp on every request")
    ts = [float(t) for t in timestamps if t is not None]
    if not ts:
        return []
    for i in range(1, len(ts)):
        if ts[i] < ts[i - 1]:
            raise ValueError(f"trace timestamps decrease at request {i}: {ts[i - 1]} → {ts[i]}")
    t0 = ts[0]
    return [(t - t0) / time_scale for t in ts]


def gaps_cv(offsets: Sequence[float]) -> tuple[float, float]:
    """(mean rate, coefficient of variation of the gaps) of a schedule; for checks/reports."""
    gaps = [offsets[i] - offsets[i - 1] for i in range(1, len(offsets))]
    if not gaps:
        return 0.0, 0.0
    mean = sum(gaps) / len(gaps)
    var = sum((g - mean) ** 2 for g in gaps) / len(gaps)
    return (1.0 / mean if mean > 0 else math.inf), (math.sqrt(var) / mean if mean > 0 else 0.0)
