"""Arrival schedules: rates, variability (CV) and burstiness, ramps, traces."""

from __future__ import annotations

import math

import pytest

from loadgen.schedule import ArrivalSpec, from_timestamps, gaps_cv, open_loop


def test_poisson_rate_and_cv() -> None:
    """Poisson: mean rate as asked (±3 %), gaps' coefficient of variation ≈ 1."""
    offs = open_loop(ArrivalSpec(rate=200.0), num_requests=20_000, seed=1)
    rate, cv = gaps_cv(offs)
    assert len(offs) == 20_000
    assert rate == pytest.approx(200.0, rel=0.03)
    assert cv == pytest.approx(1.0, abs=0.04)


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 2.0, 4.0])
def test_gamma_burstiness_sets_cv(burstiness: float) -> None:
    """Gamma gaps: CV = 1/sqrt(burstiness) at an unchanged mean rate."""
    offs = open_loop(ArrivalSpec(rate=50.0, arrival="gamma", burstiness=burstiness),
                     num_requests=20_000, seed=2)
    rate, cv = gaps_cv(offs)
    assert rate == pytest.approx(50.0, rel=0.04)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_constant_is_evenly_spaced_from_zero() -> None:
    """Constant arrivals: offsets i / rate exactly, starting at 0."""
    offs = open_loop(ArrivalSpec(rate=4.0, arrival="constant"), duration_s=2.0)
    assert offs == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75])


def test_duration_bounds_and_count_bounds() -> None:
    """Every offset lies inside the duration; a count gives exactly that many."""
    offs = open_loop(ArrivalSpec(rate=100.0), duration_s=10.0, seed=3)
    assert all(0 <= o < 10.0 for o in offs)
    assert len(offs) == pytest.approx(1000, rel=0.1)
    both = open_loop(ArrivalSpec(rate=100.0), duration_s=10.0, num_requests=50, seed=3)
    assert len(both) == 50


def test_schedule_is_absolute_and_reproducible() -> None:
    """Same seed, same schedule; a different seed, a different one."""
    spec = ArrivalSpec(rate=30.0)
    assert open_loop(spec, num_requests=100, seed=7) == open_loop(spec, num_requests=100, seed=7)
    assert open_loop(spec, num_requests=100, seed=7) != open_loop(spec, num_requests=100, seed=8)


def test_linear_ramp_follows_integrated_rate() -> None:
    """Rate 10 → 30 over 100 s: ~2000 arrivals, ~750 of them in the first half."""
    offs = open_loop(ArrivalSpec(rate=10.0, ramp_to=30.0), duration_s=100.0, seed=4)
    assert len(offs) == pytest.approx(2000, rel=0.05)
    first_half = sum(1 for o in offs if o < 50.0)
    assert first_half / len(offs) == pytest.approx(750 / 2000, abs=0.03)
    assert offs == sorted(offs)
    # with only a count, the ramp lasts 2N / (start + end)
    by_count = open_loop(ArrivalSpec(rate=10.0, ramp_to=30.0), num_requests=400, seed=4)
    assert len(by_count) == 400
    assert by_count[-1] == pytest.approx(20.0, rel=0.1)


def test_trace_offsets_scale_and_validation() -> None:
    """Trace offsets start at the first timestamp; time_scale 2 halves them."""
    assert from_timestamps([5.0, 6.0, 8.0]) == [0.0, 1.0, 3.0]
    assert from_timestamps([5.0, 6.0, 8.0], time_scale=2.0) == [0.0, 0.5, 1.5]
    with pytest.raises(ValueError, match="decrease"):
        from_timestamps([1.0, 0.5])
    with pytest.raises(ValueError, match="timestamp"):
        from_timestamps([1.0, None])


def test_bad_specs_are_refused() -> None:
    """Non-positive rates, burstiness and unbounded schedules are errors, not hangs."""
    with pytest.raises(ValueError, match="rate"):
        ArrivalSpec(rate=0.0)
    with pytest.raises(ValueError, match="burstiness"):
        ArrivalSpec(rate=1.0, burstiness=0.0)
    with pytest.raises(ValueError, match="arrival"):
        ArrivalSpec(rate=1.0, arrival="uniform")
    with pytest.raises(ValueError, match="duration"):
        open_loop(ArrivalSpec(rate=1.0))
