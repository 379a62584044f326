"""The simulation check on a real emulator fleet behind pdlb, driven by loadgen: the fleet
``pdlb plan`` recommends for an input-heavy load meets the SLO and one prefill server fewer
does not (short runs at time scale 4; bench/planner.py runs the longer checks of both
workloads, docs/planner.md has their numbers)."""

from __future__ import annotations

import math

import pytest

from lb.planner import profile as profiles
from lb.planner import workload as workloads
from lb.planner.model import Model, SLOTarget
from lb.planner.search import plan
from lb.planner.simulate import simulate
from tests.planner.test_model import INPUT_HEAVY, SLOW


@pytest.mark.slow
async def test_the_recommended_fleet_meets_the_slo_and_one_fewer_does_not():
    """Input-heavy at 5 req/s: the plan is 2P:1D bound by prefill compute; simulated, it
    meets the SLO with TTFT/TPOT within 35 % of the model's; 1P:1D misses it."""
    prof = profiles.from_emulator(SLOW)
    wl = workloads.from_mix(None, **INPUT_HEAVY)
    slo = SLOTarget(ttft_ms=1500, tpot_ms=60)
    p = plan(Model(prof, wl, slo), 5.0)
    assert (p.prefill, p.decode, p.binding_pool) == (2, 1, "prefill")
    assert p.pd is not None
    sim = await simulate(prof, wl, slo, 5.0, prefill=2, decode=1, duration_s=24.0,
                         time_scale=4.0, seed=3)
    assert sim.requests >= 70 and sim.failed == 0 and sim.unfinished == 0
    assert sim.meets and math.isfinite(sim.ttft_ms)
    assert abs(p.pd.ttft_ms - sim.ttft_ms) / sim.ttft_ms < 0.35, (p.pd.ttft_ms, sim.ttft_ms)
    assert abs(p.pd.tpot_ms - sim.tpot_ms) / sim.tpot_ms < 0.35, (p.pd.tpot_ms, sim.tpot_ms)
    fewer = await simulate(prof, wl, slo, 5.0, prefill=1, decode=1, duration_s=24.0,
                           time_scale=4.0, seed=3)
    assert not fewer.meets and fewer.ttft_ms > slo.ttft_ms
