"""The check: an emulator fleet of the recommended size, behind pdlb, driven by loadgen.

Each emulated server runs the profile's coefficients (``Profile.emulator_overrides``); pdlb
runs as its own process in front (``least_tokens`` in both pools; a colocated fleet is one
pool of ``--role both`` servers reached directly through ``direct_decode_below_tokens``, as
``pdlb demo`` does). The workload's own samples become a JSONL dataset of prompts of exactly
those token counts, replayed by loadgen at Poisson ``rate`` for ``duration_s`` seconds of
model time. Requests scheduled in the first ``warmup`` fraction are left out (the queues
start empty); a request that failed or had not finished when the run was cut counts as
missing the SLO (its latency is infinite in the percentile).

``time_scale`` > 1 runs the emulators' model time faster than the wall clock (the rate is
multiplied, measured times divided by it); pdlb's and loadgen's own costs then weigh
``time_scale`` times more in model time, so keep it small.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from lb.planner.model import SLOTarget, pct
from lb.planner.profile import Profile
from lb.planner.workload import Workload, resample


@dataclass
class SimResult:
    ttft_ms: float
    tpot_ms: float
    requests: int
    failed: int
    unfinished: int
    meets: bool
    wall_s: float

    def describe(self) -> str:
        return (f"p-TTFT {self.ttft_ms:.0f} ms, p-TPOT {self.tpot_ms:.1f} ms over"
                f" {self.requests} requests ({self.failed} failed, {self.unfinished}"
                f" unfinished): {'meets' if self.meets else 'MISSES'} the SLO")


def _toml(prefill: list[str], decode: list[str], colocated: bool) -> str:
    def backends(urls: list[str]) -> str:
        return "backends = [" + ", ".join(f'{{ url = "{u}" }}' for u in urls) + "]"

    lines = ["[server]", 'host = "127.0.0.1"', "port = 0",
             "[pools.prefill]", 'policy = "least_tokens"', backends(prefill),
             "[pools.decode]", 'policy = "least_tokens"', backends(decode),
             "[health]", "interval_s = 1.0", "[log]", "access = false"]
    if colocated:
        lines += ["[resilience]", "direct_decode_below_tokens = 100000000"]
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def pdlb_process(config_path: Path) -> AsyncIterator[str]:
    """pdlb as a child process; yields its URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lb.cli", "serve", "--config", str(config_path),
        "--log-level", "error", stdout=asyncio.subprocess.PIPE)
    try:
        if proc.stdout is None:
            raise RuntimeError("pdlb's stdout is not a pipe")
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if not line.startswith("pdlb listening on "):
            raise RuntimeError(f"pdlb did not start: {line!r}")
        yield line.split()[-1]
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def write_dataset(workload: Workload, path: Path, lines: int, seed: int) -> Path:
    """The workload's samples as loadgen JSONL: prompts of exactly that many tokens."""
    from loadgen.tokenizer import load_tokenizer
    from loadgen.workload import TextMaker

    maker = TextMaker(load_tokenizer())
    rng = random.Random(seed)
    with open(path, "wb") as fh:
        for p, _c, o in resample(workload, lines, seed):
            n = max(1, p - 1)  # the server adds BOS
            fh.write(orjson.dumps({"prompt": maker.make(rng, n), "max_tokens": o,
                                   "input_len": n}) + b"\n")
    return path


async def simulate(profile: Profile, workload: Workload, slo: SLOTarget, rate: float, *,
                   prefill: int = 0, decode: int = 0, colocated: int = 0,
                   duration_s: float = 60.0, time_scale: float = 1.0, warmup: float = 0.2,
                   seed: int = 0, grace_s: float | None = None) -> SimResult:
    """Run the fleet (``colocated`` > 0: that many ``both`` servers instead of PD)."""
    from emulator.cluster import EmulatorCluster
    from loadgen import LoadConfig, run

    loop = asyncio.get_running_loop()
    started = loop.time()
    tmp = Path(tempfile.mkdtemp(prefix="pdlb-plan-sim-"))
    lines = min(4000, max(50, math.ceil(rate * duration_s * 1.2)))
    dataset = write_dataset(workload, tmp / "workload.jsonl", lines, seed)
    wall_s = duration_s / time_scale
    if grace_s is None:  # long enough for the slowest request at the SLO, bounded
        grace_s = min(120.0, 2.0 + 2.0 * (slo.ttft_ms + max(workload.outputs) * slo.tpot_ms)
                      / 1e3 / time_scale)
    async with contextlib.AsyncExitStack() as stack:
        if colocated:
            knobs = profile.emulator_overrides("decode")
            co = await stack.enter_async_context(EmulatorCluster(
                both=colocated, mode="subprocess", time_scale=time_scale, seed=seed, **knobs))
            text = _toml(co.both_urls[:1], co.both_urls, colocated=True)
        else:
            pc = await stack.enter_async_context(EmulatorCluster(
                prefill=prefill, mode="subprocess", time_scale=time_scale, seed=seed,
                **profile.emulator_overrides("prefill")))
            dc = await stack.enter_async_context(EmulatorCluster(
                decode=decode, mode="subprocess", time_scale=time_scale, seed=seed,
                **profile.emulator_overrides("decode")))
            text = _toml(pc.prefill_urls, dc.decode_urls, colocated=False)
        cfg_path = tmp / "pdlb.toml"
        cfg_path.write_text(text)
        url = await stack.enter_async_context(pdlb_process(cfg_path))
        config = LoadConfig(url=url, dataset=str(dataset), dataset_format="jsonl",
                            rate=rate * time_scale, duration_s=wall_s, seed=seed,
                            timeout_s=wall_s + grace_s + 30, preflight=False,
                            label=f"plan-sim {prefill}P{decode}D{colocated}C")
        stopping = asyncio.Event()
        cut = loop.call_later(wall_s + grace_s, stopping.set)
        try:
            result = await run(config, stopping=stopping)
        finally:
            cut.cancel()
    return summarize(result.records, slo, time_scale, wall_s * warmup,
                     loop.time() - started)


def summarize(records: list[Any], slo: SLOTarget, time_scale: float, skip_s: float,
              wall_s: float) -> SimResult:
    from loadgen.metrics import tpot

    ttfts, tpots = [], []
    failed = unfinished = 0
    kept = [r for r in records if r.scheduled >= skip_s]
    for r in kept:
        if not r.ok:
            failed += 1 if r.finished is not None else 0
            unfinished += 1 if r.finished is None else 0
            ttfts.append(math.inf)
            tpots.append(math.inf)
            continue
        t = r.ttft
        ttfts.append(t * time_scale * 1e3 if t is not None else math.inf)
        tp = tpot(r)
        if tp is not None:
            tpots.append(tp * time_scale * 1e3)
    ttft = pct(ttfts, slo.percentile) if ttfts else math.inf
    tp_ = pct(tpots, slo.percentile) if tpots else math.inf
    meets = bool(kept) and ttft <= slo.ttft_ms and tp_ <= slo.tpot_ms
    return SimResult(ttft, tp_, len(kept), failed, unfinished, meets, wall_s)
