"""The live recommendation (lb/planner/online.py): convergence on the offline plan,
reaction to a workload shift, hysteresis — first with a controlled clock, then through a
real pdlb in front of emulators, driven by loadgen."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from emulator.cluster import EmulatorCluster
from lb.accesslog import RequestRecord
from lb.planner import profile as profiles
from lb.planner import workload as workloads
from lb.planner.model import Model, SLOTarget
from lb.planner.online import Recommender
from lb.planner.search import plan
from lb.planner.settings import PlannerConfig
from loadgen import LoadConfig, run
from loadgen.workload import LengthDist
from tests.conftest import make_config
from tests.planner.test_model import INPUT_HEAVY, OUTPUT_HEAVY, SLOW

SLO = SLOTarget(1500, 60, 90)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(prompt: int, output: int, cached: int = 0) -> RequestRecord:
    rec = RequestRecord(0.0)
    rec.usage = {"prompt_tokens": prompt, "completion_tokens": output,
                 "prompt_tokens_details": {"cached_tokens": cached}}
    return rec


def _feed(rec: Recommender, clock: Clock, lengths: dict[str, str], rate: float,
          seconds: float, seed: int = 0) -> None:
    """Requests of the workload at exactly ``rate`` per second, the clock advancing."""
    wl = workloads.from_mix(None, **lengths, samples=2000, seed=seed)
    step = 1.0 / rate
    rng = random.Random(seed)
    t_end = clock.now + seconds
    while clock.now < t_end:
        i = rng.randrange(len(wl))
        rec.observe(_record(wl.prompts[i], wl.outputs[i]), 200)
        clock.now += step
        rec.refresh()


def _offline(lengths: dict[str, str], rate: float) -> tuple[int, int]:
    p = plan(Model(profiles.from_emulator(SLOW), workloads.from_mix(None, **lengths), SLO), rate)
    assert p.prefill is not None and p.decode is not None
    return p.prefill, p.decode


def _recommender(clock: Clock, kv: list[int] | None = None, **cfg: Any) -> Recommender:
    base: dict[str, Any] = dict(enabled=True, profile="x", ttft_ms=1500, tpot_ms=60,
                                window_s=30, interval_s=1, model_load_s=20, warmup_s=10,
                                scale_down_after_s=60)
    held = kv if kv is not None else [0]
    return Recommender(PlannerConfig(**{**base, **cfg}), profiles.from_emulator(SLOW),
                       lambda pool: 1, lambda: held[0], clock=clock)


def _now(rec: Recommender) -> tuple[int, int]:
    return int(rec.recommended("prefill")), int(rec.recommended("decode"))


def test_steady_load_converges_on_the_offline_plan():
    """Under steady input-heavy load the recommendation equals pdlb plan's, within one
    window."""
    clock = Clock()
    rec = _recommender(clock)
    _feed(rec, clock, INPUT_HEAVY, 6.0, 40)
    want = _offline(INPUT_HEAVY, 6.0)
    assert _now(rec) == want
    assert rec.rate("requests") == pytest.approx(6.0, rel=0.05)
    assert rec.utilisation("prefill", "compute") > 0.5  # one prefill server is not enough


def test_a_shift_to_output_heavy_moves_the_ratio_within_the_window():
    """Input-heavy → output-heavy: decode goes up within one window (up is immediate);
    prefill comes down only after scale_down_after_s (and load time + warm-up) held."""
    clock = Clock()
    rec = _recommender(clock)
    _feed(rec, clock, INPUT_HEAVY, 6.0, 40)
    before = _now(rec)
    shift = clock.now
    want = _offline(OUTPUT_HEAVY, 6.0)
    assert want[1] > before[1] and want[0] < before[0]
    up_at = None
    while clock.now - shift < 200:
        _feed(rec, clock, OUTPUT_HEAVY, 6.0, 1, seed=int(clock.now))
        p, d = _now(rec)
        if up_at is None and d >= want[1]:
            up_at = clock.now - shift
        if p == want[0]:
            down_at = clock.now - shift
            break
    assert up_at is not None and up_at <= rec.config.window_s + rec.config.interval_s
    assert rec.config.scale_down_after_s <= down_at <= (
        rec.config.window_s + rec.config.scale_down_after_s + 2 * rec.config.interval_s)
    assert _now(rec) == want


def test_no_flapping_under_a_load_that_swings():
    """A load that swings every 10 s never lowers the count before scale_down_after_s."""
    clock = Clock()
    rec = _recommender(clock, window_s=10, scale_down_after_s=60)
    history = []
    for k in range(8):
        _feed(rec, clock, INPUT_HEAVY, 8.0 if k % 2 == 0 else 2.0, 10, seed=k)
        history.append(_now(rec))
    peak = history[0]
    assert all(h == peak for h in history[:6]), history  # 60 s: held at the peak
    assert rec.pools["prefill"].raw < peak[0]  # while the model alone would have dropped


def test_outstanding_kv_keeps_decode_replicas():
    """Decode is not recommended below what its in-flight KV tokens need."""
    clock = Clock()
    kv = [0]
    rec = _recommender(clock, kv, window_s=10, scale_down_after_s=5, model_load_s=0,
                       warmup_s=0)
    _feed(rec, clock, OUTPUT_HEAVY, 6.0, 20)
    high = _now(rec)[1]
    assert high >= 2
    kv[0] = int(0.9 * 40000 * high)  # the pool's KV is full
    _feed(rec, clock, OUTPUT_HEAVY, 0.5, 40)
    assert _now(rec)[1] == high
    kv[0] = 0  # drained: now it may come down
    _feed(rec, clock, OUTPUT_HEAVY, 0.5, 20)
    assert _now(rec)[1] < high


def test_only_answered_requests_with_usage_count():
    """Errors and streams without usage teach nothing (counted as unknown)."""
    clock = Clock()
    rec = _recommender(clock)
    rec.observe(_record(100, 10), 503)
    bare = RequestRecord(0.0)
    bare.prompt_tokens = 100
    rec.observe(bare, 200)
    assert not rec._events and rec.unknown_output == 1
    rec.observe(_record(100, 10, cached=500), 200)
    assert next(iter(rec._events))[1:] == (100, 99, 10)


# -- through pdlb ------------------------------------------------------------------------------
def _gauges(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            out[labels] = float(value)
    return out


async def _drive(url: str, lengths: dict[str, str], rate: float, seconds: float) -> None:
    i_mean, i_std = lengths["input_len"].split(":")
    o_mean, o_std = lengths["output_len"].split(":")
    cfg = LoadConfig(url=url, rate=rate, arrival="constant", duration_s=seconds,
                     input_len=LengthDist(int(i_mean), float(i_std), 1, 4 * int(i_mean)),
                     output_len=LengthDist(int(o_mean), float(o_std), 1, 4 * int(o_mean)),
                     preflight=False)
    result = await run(cfg)
    assert result.summary["failed"] == 0


@pytest.mark.slow
async def test_pdlb_exports_the_recommendation_and_follows_a_shift(start_pdlb, tmp_path: Path):
    """pdlb in front of an emulated pair, with [planner] on: after steady input-heavy load
    its recommendation is the offline plan (±1 for the sampled mix), and after the shift to
    output-heavy the decode count goes up and the prefill count comes down."""
    prof = tmp_path / "profile.json"
    profiles.from_emulator(SLOW).write(prof)
    planner = {"enabled": True, "profile": str(prof), "slo": "ttft:1500,tpot:60",
               "window_s": 4.0, "interval_s": 0.25, "model_load_s": 0.0, "warmup_s": 0.0,
               "scale_down_after_s": 2.0}
    async with EmulatorCluster(prefill=1, decode=1, mode="subprocess", time_scale=20.0,
                               **SLOW) as c:
        url, _app = await start_pdlb(make_config(c.prefill_urls, c.decode_urls,
                                                 planner=planner))
        async with aiohttp.ClientSession() as http:
            async def scrape() -> tuple[dict[str, float], dict[str, float]]:
                async with http.get(url + "/metrics") as r:
                    text = await r.text()
                return (_gauges(text, "pdlb_pool_recommended_replicas"),
                        _gauges(text, "pdlb_planner_arrival_rate"))

            await _drive(url, INPUT_HEAVY, 6.0, 5.0)
            rec, rates = await scrape()
            want = _offline(INPUT_HEAVY, 6.0)
            got = (rec['pool="prefill"'], rec['pool="decode"'])
            assert abs(got[0] - want[0]) <= 1 and abs(got[1] - want[1]) <= 1, (got, want)
            assert got[0] >= 2 and rates['kind="requests"'] == pytest.approx(6.0, rel=0.25)
            await _drive(url, OUTPUT_HEAVY, 6.0, 6.0)
            await asyncio.sleep(0.3)
            rec, _ = await scrape()
            want2 = _offline(OUTPUT_HEAVY, 6.0)
            got2 = (rec['pool="prefill"'], rec['pool="decode"'])
            assert abs(got2[0] - want2[0]) <= 1 and abs(got2[1] - want2[1]) <= 1, (got2, want2)
            assert got2[1] > got[1] and got2[0] < got[0]
