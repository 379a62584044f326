"""Tenants under saturation: FIFO admission vs priority classes + fair queuing, measured.

    PYTHONPATH=. flock /tmp/pdlb-heavy.lock .venv/bin/python bench/tenants.py     # ~2 min
    PYTHONPATH=. .venv/bin/python bench/tenants.py --duration 5                    # quicker

One prefill + one decode emulator (subprocesses, ``--time-scale``) behind ``pdlb serve`` (a
subprocess) whose decode budget runs ``--slots`` requests at once; streamed completions of
``--prompt-words`` words and ``--max-tokens`` tokens, open loop (fixed spacing), for
``--duration`` seconds per scenario:

* ``alone``: the small tenant by itself at ``--rate`` req/s — its baseline;
* ``flood``: the same plus a big tenant at ``--ratio`` × that rate — pdlb without
  ``[tenants]`` (FIFO), then with two equal tenants (fair queuing);
* ``batch``: an interactive tenant at ``--rate`` plus a batch tenant at ``--ratio`` × —
  FIFO, then with classes (interactive over batch, ``aging_s`` 10).

Printed per tenant: requests sent, answered 200, refused (429/503), and TTFT p50/p90/p99
of the successful ones (client side: until the first SSE data bytes), in ms; plus the
admitted rate. Numbers are this machine's (2 shared cores: client, pdlb and emulators on
them); compare rows of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from emulator import EmulatorCluster


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    ttft: list[float] = field(default_factory=list)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def config_text(prefill: str, decode: str, budget: int, tenants: str) -> str:
    return f"""
[pools.prefill]
backends = ["{prefill}"]
[pools.decode]
backends = ["{decode}"]
max_inflight_tokens = {budget}
max_queue = 32
queue_timeout_s = 5
[tokenizer]
kind = "emulator"
[log]
access = false
{tenants}"""


FAIR = """
[tenants.small]
api_keys = ["k-small"]
[tenants.big]
api_keys = ["k-big"]
"""
CLASSES = """
[tenancy]
aging_s = 10
[tenants.small]
api_keys = ["k-small"]
[tenants.big]
api_keys = ["k-big"]
priority = "batch"
"""


@contextlib.asynccontextmanager
async def pdlb(config: Path) -> AsyncIterator[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lb.cli", "serve", "--config", str(config), "--port", "0",
        "--log-level", "warning", stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if not line.startswith("pdlb listening on "):
            raise RuntimeError(f"pdlb did not start: {line!r}")
        yield line.split()[-1]
    finally:
        proc.terminate()
        await proc.wait()


async def one(http: aiohttp.ClientSession, url: str, key: str, body: dict[str, object],
              tally: Tally) -> None:
    tally.sent += 1
    started = time.perf_counter()
    try:
        async with http.post(url + "/v1/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as r:
            if r.status != 200:
                tally.refused[r.status] = tally.refused.get(r.status, 0) + 1
                await r.read()
                return
            first = None
            async for _ in r.content.iter_any():
                if first is None:
                    first = time.perf_counter() - started
            tally.ok += 1
            tally.ttft.append(first or 0.0)
    except aiohttp.ClientError:
        tally.refused[0] = tally.refused.get(0, 0) + 1


async def sender(http: aiohttp.ClientSession, url: str, key: str, rate: float,
                 duration: float, body: dict[str, object], tally: Tally) -> None:
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    n = 0
    while True:
        due = start + n / rate
        if due - start >= duration:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(one(http, url, key, body, tally)))
        n += 1
    await asyncio.gather(*tasks)


async def scenario(url: str, args: argparse.Namespace, big: bool) -> dict[str, Tally]:
    body = {"model": "emulated-model", "prompt": "word " * args.prompt_words,
            "max_tokens": args.max_tokens, "stream": True}
    out = {"small": Tally(), "big": Tally()}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        jobs = [sender(http, url, "k-small", args.rate, args.duration, body, out["small"])]
        if big:
            jobs.append(sender(http, url, "k-big", args.rate * args.ratio, args.duration, body,
                               out["big"]))
        await asyncio.gather(*jobs)
    return out


def row(name: str, setup: str, tenant: str, t: Tally, duration: float) -> str:
    refused = sum(t.refused.values())
    ms = [x * 1000 for x in t.ttft]
    share = 100 * t.ok / max(1, t.sent)
    return (f"| {name} | {setup} | {tenant} | {t.sent} | {t.ok} ({share:.0f}%)"
            f" | {refused} | {pct(ms, 0.5):.0f} | {pct(ms, 0.9):.0f} | {pct(ms, 0.99):.0f}"
            f" | {t.ok / duration:.1f} |")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per scenario")
    ap.add_argument("--rate", type=float, default=3.0, help="small tenant's req/s")
    ap.add_argument("--ratio", type=float, default=10.0, help="big tenant's rate ÷ small's")
    ap.add_argument("--slots", type=int, default=4, help="requests the decode budget runs")
    ap.add_argument("--prompt-words", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--time-scale", type=float, default=10.0)
    args = ap.parse_args()
    budget = args.slots * (args.prompt_words + 2 + args.max_tokens)
    print(f"# bench/tenants.py: {args.duration:g} s per scenario, small {args.rate:g} req/s,"
          f" big x{args.ratio:g}, {args.slots} slots, prompt {args.prompt_words} words,"
          f" max_tokens {args.max_tokens}, emulator time_scale {args.time_scale:g}")
    print("\n| scenario | pdlb | tenant | sent | 200 | refused | TTFT p50 ms | p90 | p99 |"
          " ok/s |\n|---|---|---|---|---|---|---|---|---|---|")
    async with EmulatorCluster(prefill=1, decode=1, mode="subprocess", seed=5,
                               time_scale=args.time_scale) as emus:
        with tempfile.TemporaryDirectory() as tmp:
            runs = [("alone", "FIFO", "", False), ("alone", "fair", FAIR, False),
                    ("flood", "FIFO", "", True), ("flood", "fair", FAIR, True),
                    ("batch", "FIFO", "", True), ("batch", "classes", CLASSES, True)]
            for name, setup, tenants, big in runs:
                path = Path(tmp) / f"{name}-{setup}.toml"
                path.write_text(config_text(emus.prefill_urls[0], emus.decode_urls[0], budget,
                                            tenants))
                async with pdlb(path) as url:
                    result = await scenario(url, args, big)
                labels = (("small", "interactive"), ("big", "batch")) if name == "batch" else (
                    ("small", "small"), ("big", "big"))
                for key, label in labels:
                    if result[key].sent:
                        print(row(name, setup, label, result[key], args.duration), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
