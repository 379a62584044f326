"""The simulation check's plumbing: an emulator fleet behind pdlb, driven by loadgen (one
small, short run; bench/planner.py runs the real checks)."""

from __future__ import annotations

import math

from lb.planner import profile as profiles
from lb.planner import workload as workloads
from lb.planner.model import Model, SLOTarget
from lb.planner.simulate import simulate
from tests.planner.test_model import SLOW


async def test_a_lightly_loaded_fleet_meets_the_slo_and_matches_the_model():
    """1P:1D at a light load: every request answered, the SLO met, and the simulated
    TTFT/TPOT percentiles within 35 % of the model's."""
    prof = profiles.from_emulator(SLOW)
    wl = workloads.from_mix(None, input_len="512:128", output_len="24:4")
    slo = SLOTarget(ttft_ms=2000, tpot_ms=80)
    sim = await simulate(prof, wl, slo, 1.5, prefill=1, decode=1, duration_s=24.0,
                         time_scale=4.0, seed=3)
    pred = Model(prof, wl, slo).disaggregated(1.5, 1, 1)
    assert sim.requests >= 20 and sim.failed == 0 and sim.unfinished == 0
    assert sim.meets and math.isfinite(sim.ttft_ms)
    assert abs(pred.ttft_ms - sim.ttft_ms) / sim.ttft_ms < 0.35, (pred.ttft_ms, sim.ttft_ms)
    assert abs(pred.tpot_ms - sim.tpot_ms) / sim.tpot_ms < 0.35, (pred.tpot_ms, sim.tpot_ms)
