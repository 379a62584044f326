"""The sweep's search for the highest rate meeting the SLO (DistServe's goodput)."""

from __future__ import annotations

from typing import Any

import pytest

from loadgen import SLO, LoadConfig, RunResult
from loadgen import sweep as sweep_mod


def fake_run(capacity: float, behind_from: float = float("inf")) -> Any:
    """A stand-in for loadgen.run: the SLO holds up to `capacity` req/s (no HTTP here:
    this tests the search, the runs themselves are tested end to end elsewhere)."""
    async def run(config: LoadConfig, **_: Any) -> RunResult:
        rate = config.rate or 0.0
        met = rate <= capacity
        summary = {"slo": {"ttft_ms": 1.0}, "slo_met": met, "slo_attainment": 1.0 if met else 0.5,
                   "goodput": rate if met else rate / 2, "request_throughput": rate,
                   "completed": 10, "failed": 0, "fell_behind": rate >= behind_from}
        return RunResult(config.to_dict(), [], summary)
    return run


CFG = LoadConfig(url="http://x", rate=1.0, duration_s=1.0, slo=SLO(ttft_ms=100))


async def test_doubling_then_bisection(monkeypatch: pytest.MonkeyPatch) -> None:
    """1, 2, 4, 8, 16 (miss), then bisection: 12 ✓, 14 ✗, 13 ✓, 13.5 ✗ → 13."""
    monkeypatch.setattr(sweep_mod, "run", fake_run(13.0))
    res = await sweep_mod.sweep(CFG, start=1.0, max_rate=100.0, bisect_steps=4)
    assert [s.rate for s in res.steps] == [1, 2, 4, 8, 16, 12, 14, 13, 13.5]
    assert res.max_rate == 13.0
    assert "13.00 req/s" in res.table()


async def test_explicit_rates_stop_at_first_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    """A list of rates runs in order and stops at the first miss."""
    monkeypatch.setattr(sweep_mod, "run", fake_run(25.0))
    res = await sweep_mod.sweep(CFG, rates=[40, 10, 20, 30])
    assert [s.rate for s in res.steps] == [10, 20, 30]
    assert res.max_rate == 20


async def test_client_falling_behind_is_not_a_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step where the client fell behind counts as a miss, and the note says why."""
    monkeypatch.setattr(sweep_mod, "run", fake_run(1000.0, behind_from=8.0))
    res = await sweep_mod.sweep(CFG, start=1.0, max_rate=100.0, bisect_steps=1)
    assert res.max_rate == 6.0  # 1, 2, 4, 8 (behind), bisect 6 ✓
    assert "fell behind" in res.note


async def test_no_passing_rate_and_bad_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing passes → None; a sweep without an SLO is refused."""
    monkeypatch.setattr(sweep_mod, "run", fake_run(0.5))
    res = await sweep_mod.sweep(CFG, start=1.0, max_rate=4.0, bisect_steps=2)
    assert res.max_rate is None
    with pytest.raises(ValueError, match="SLO"):
        await sweep_mod.sweep(CFG.replace(slo=None))
