"""The planner's model and search, on measured and emulator profiles (no fleet simulation:
bench/planner.py runs those; docs/planner.md has its numbers)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import orjson
import pytest

from emulator.cluster import EmulatorCluster
from lb.planner import profile as profiles
from lb.planner import workload as workloads
from lb.planner.measure import Sweep, profile_servers
from lb.planner.model import DECODE_KV, PREFILL_COMPUTE, Model, SLOTarget, erlang_c
from lb.planner.search import plan

SLOW = {"step_base_ms": 20, "decode_per_seq_ms": 0.5, "decode_per_kv_token_us": 0.5,
        "prefill_tokens_per_s": 4000, "kv_capacity_tokens": 40000,
        "max_num_batched_tokens": 2048}
SLO = SLOTarget(ttft_ms=1500, tpot_ms=60, percentile=90)
INPUT_HEAVY = {"input_len": "1024:256", "output_len": "32:8"}
OUTPUT_HEAVY = {"input_len": "64:16", "output_len": "256:64"}


async def _measure() -> profiles.Profile:
    sweep = Sweep(prompt_lengths=(256, 1024), prefill_batches=(1, 3), concurrencies=(1, 8, 24),
                  contexts=(64, 512), decode_tokens=24,
                  max_batched_tokens=SLOW["max_num_batched_tokens"], time_scale=4.0)
    async with EmulatorCluster(prefill=1, decode=1, mode="subprocess", time_scale=4.0,
                               **SLOW) as c:
        return await profile_servers(c.prefill_urls[0], c.decode_urls[0], sweep,
                                     emulator=profiles.from_emulator(SLOW).emulator)


@pytest.fixture(scope="module")
def measured() -> profiles.Profile:
    """A profile measured by the sweep against a real (emulated) prefill + decode pair."""
    return asyncio.run(_measure())


async def test_the_sweep_recovers_the_emulators_model(measured):
    """Fitted coefficients predict every measured ITL within 15 % (prefill batch times within
    30 %) and land near the emulator's knobs (the HTTP round trip sits in the fixed terms)."""
    pf, dc = measured.prefill, measured.decode
    assert len(pf.points) == 4 and len(dc.points) == 6
    assert 3000 < pf.tokens_per_s < 5000
    assert 18 <= dc.base_ms < 30
    for pt in dc.points:
        fit = dc.itl_s(pt["concurrency"], pt["context"]) * 1e3
        assert fit == pytest.approx(pt["itl_ms"], rel=0.15), pt
    for pt in pf.points:
        steps = math.ceil(pt["prompt_tokens"] * pt["batch"] / pf.max_batched_tokens)
        fit = steps * pf.fixed_ms / 1e3 + pt["prompt_tokens"] * pt["batch"] / pf.tokens_per_s
        # one batch's wall time x 4 (time scale): a few ms of scheduling jitter on a busy
        # box is 10-20 % of the shortest point, hence the wider bound than the ITL medians
        assert fit == pytest.approx(pt["seconds"], rel=0.3), pt
    assert dc.kv_capacity_tokens == 40000  # from the emulator's state (no cache_config_info)


async def test_input_and_output_heavy_get_different_ratios(measured):
    """Input-heavy work wants relatively more prefill servers than output-heavy work."""
    ih = plan(Model(measured, workloads.from_mix(None, **INPUT_HEAVY), SLO), 4.0)
    oh = plan(Model(measured, workloads.from_mix(None, **OUTPUT_HEAVY), SLO), 4.0)
    assert ih.prefill and ih.decode and oh.prefill and oh.decode
    assert ih.prefill / ih.decode > oh.prefill / oh.decode
    assert ih.binding == PREFILL_COMPUTE and oh.binding_pool == "decode"


@pytest.mark.parametrize("lengths", [INPUT_HEAVY, OUTPUT_HEAVY])
async def test_the_plan_is_the_smallest(measured, lengths):
    """The recommended fleet meets the SLO in the model; one server fewer in either pool
    does not; more load never needs fewer servers."""
    model = Model(measured, workloads.from_mix(None, **lengths), SLO)
    last = (0, 0)
    for rate in (1.0, 2.0, 4.0, 6.0):
        p = plan(model, rate)
        assert p.prefill and p.decode and p.pd is not None and p.pd.ok
        assert p.pd.ttft_ms <= SLO.ttft_ms and p.pd.tpot_ms <= SLO.tpot_ms
        assert p.headroom is not None and p.headroom >= 0
        if p.prefill > 1:
            assert not model.disaggregated(rate, p.prefill - 1, p.decode).ok
        if p.decode > 1:
            assert not model.disaggregated(rate, p.prefill, p.decode - 1).ok
        assert (p.prefill, p.decode) >= last
        last = (p.prefill, p.decode)


def test_colocated_pays_for_prefill_interference():
    """Long prompts on a colocated server stall its decodes: TPOT there is worse than on a
    decode server with the same load per server."""
    prof = profiles.from_emulator(SLOW)
    model = Model(prof, workloads.from_mix(None, input_len="2000", output_len="100"), SLO)
    pd = model.disaggregated(1.0, 4, 1)
    co = model.colocated(1.0, 1)
    assert co.tpot_ms > pd.tpot_ms * 1.2
    assert co.utilisation["prefill"] == pytest.approx(1.0 * 2000 / 4000, rel=0.01)


def test_decode_kv_capacity_binds_long_contexts():
    """A decode pool whose KV cannot hold the running contexts fails on KV, not ITL."""
    prof = profiles.from_emulator({**SLOW, "kv_capacity_tokens": 9000})
    model = Model(prof, workloads.from_mix(None, input_len="4000", output_len="200"), SLO)
    assert DECODE_KV in model.disaggregated(1.0, 8, 1).failed
    p = plan(model, 1.0)
    assert p.decode is not None and p.decode > 1


def test_erlang_c():
    """Erlang C against textbook values (1 server = rho; c=2, a=1 → 1/3)."""
    assert erlang_c(1, 0.5) == pytest.approx(0.5)
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(3, 3.5) == 1.0


def test_profile_round_trip_and_bad_files(tmp_path: Path):
    """A profile survives write/load; a wrong file is refused with its path and key."""
    prof = profiles.from_emulator(SLOW)
    back = profiles.load(prof.write(tmp_path / "p.json"))
    assert back == prof
    assert back.emulator_overrides("prefill")["prefill_tokens_per_s"] == 4000
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(profiles.ProfileError, match="not JSON"):
        profiles.load(bad)
    data = prof.to_dict()
    data["decode"]["base_ms"] = -1
    bad.write_bytes(orjson.dumps(data))
    with pytest.raises(profiles.ProfileError, match="decode: base_ms must be > 0"):
        profiles.load(bad)
    bad.write_text('{"schema": "x"}')
    with pytest.raises(profiles.ProfileError, match="not a planner profile"):
        profiles.load(bad)
    with pytest.raises(profiles.ProfileError, match="cannot read"):
        profiles.load(tmp_path / "missing.json")


def test_access_log_trace(tmp_path: Path):
    """The JSON access log gives lengths, cache hits and the observed rate; other lines and
    failed requests are skipped."""
    lines = [
        '2026-12-07 10:00:00 INFO pdlb: started',
        orjson.dumps({"time": "2026-12-07T10:00:00.000Z", "status": 200, "prompt_tokens": 1000,
                      "cached_tokens": 400, "output_tokens": 50}).decode(),
        orjson.dumps({"time": "2026-12-07T10:00:01.000Z", "status": 503, "prompt_tokens": 9,
                      "output_tokens": None}).decode(),
        orjson.dumps({"time": "2026-12-07T10:00:02.000Z", "status": 200, "prompt_tokens": 200,
                      "cached_tokens": None, "output_tokens": 300}).decode(),
        "{not json",
    ]
    log = tmp_path / "access.json"
    log.write_text("\n".join(lines) + "\n")
    wl = workloads.from_access_log(log)
    assert wl.prompts == (1000, 200) and wl.cached == (400, 0) and wl.outputs == (50, 300)
    assert wl.observed_rate == pytest.approx(0.5)
    assert wl.mean_uncached == pytest.approx(400)
    empty = tmp_path / "empty.json"
    empty.write_text(lines[0] + "\n")
    with pytest.raises(workloads.WorkloadError, match="no access lines"):
        workloads.from_access_log(empty)


def test_jsonl_dataset_lengths(tmp_path: Path):
    """A loadgen JSONL: prompt tokens from the client tokenizer (or ``input_len``), output
    from ``max_tokens``; a bad line names its file and line."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": " hello world again", "max_tokens": 7}\n'
                    '{"prompt": "x", "input_len": 300, "max_tokens": 20}\n')
    wl = workloads.from_dataset(data)
    assert wl.prompts == (3, 300) and wl.outputs == (7, 20)
    data.write_text('{"prompt": "a", "max_tokens": 0}\n')
    with pytest.raises(workloads.WorkloadError, match=r"d\.jsonl:1"):
        workloads.from_dataset(data)
