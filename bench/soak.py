"""Soak pdlb with faults injected: bounded in time, prints what happened to every request.

    python bench/soak.py                       # 5 minutes, default rate, faults on
    python bench/soak.py --duration 60 --rate 20

Starts 2 prefill + 2 decode emulated servers (subprocesses) and pdlb (a subprocess, so its
RSS is its own), drives them with loadgen's input-heavy mix on an open-loop Poisson schedule,
and every ``--fault-every`` seconds injects one fault on a random server for a few seconds:
a 30 % 5xx rate, dropped streams, +2 s latency, prefill without kv_transfer_params, or a
failing health check. Prints requests sent / completed / rejected (429/503) / failed, p99
latencies, how requests ended by status, and pdlb's RSS and in-flight counters before and
after. Exit status 1 if pdlb's counters are not back to zero or any request hung.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FAULTS = [
    ("fail_rate", {"fail_rate": 0.3}, "any"),
    ("drop_after_chunks", {"drop_after_chunks": 5}, "decode"),
    ("extra_latency_ms", {"extra_latency_ms": 2000}, "any"),
    ("omit_kv_params", {"omit_kv_params": True}, "prefill"),
    ("unhealthy", {"unhealthy": True}, "any"),
]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def gauges(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("pdlb_pool_inflight", "pdlb_admitted_tokens")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def inject(http: aiohttp.ClientSession, prefill: list[str], decode: list[str],
                 every: float, hold: float, stop: asyncio.Event, log: Counter[str]) -> None:
    rng = random.Random(11)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
            return
        except TimeoutError:
            pass
        name, knobs, role = rng.choice(FAULTS)
        pool = prefill if role == "prefill" else decode if role == "decode" else prefill + decode
        target = rng.choice(pool)
        async with http.post(target + "/_emulator/faults", json=knobs) as r:
            r.raise_for_status()
        log[name] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), hold)
        async with http.post(target + "/_emulator/reset") as r:
            r.raise_for_status()


async def main(args: argparse.Namespace) -> int:
    from emulator.cluster import EmulatorCluster
    from loadgen import LoadConfig, run

    async with EmulatorCluster(prefill=2, decode=2, mode="subprocess", seed=2) as cluster:
        tmp = Path(tempfile.mkdtemp(prefix="pdlb-soak-"))
        cfg = tmp / "soak.toml"
        backends = lambda urls: ", ".join(f'"{u}"' for u in urls)  # noqa: E731
        cfg.write_text(
            "[server]\nport = 0\n[server.timeouts]\nfirst_byte_s = 10\nidle_s = 5\n"
            f"[pools.prefill]\nbackends = [{backends(cluster.prefill_urls)}]\n"
            "max_inflight_tokens = 60000\nqueue_timeout_s = 5\n"
            f"[pools.decode]\nbackends = [{backends(cluster.decode_urls)}]\n"
            "max_inflight_tokens = 400000\nqueue_timeout_s = 5\n"
            "[health]\ninterval_s = 0.5\nfailures_to_eject = 2\n"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lb.cli", "serve", "--config", str(cfg), "--log-level", "error",
            stdout=asyncio.subprocess.PIPE, cwd=str(REPO))
        assert proc.stdout is not None
        url = (await proc.stdout.readline()).decode().split()[-1]
        async with aiohttp.ClientSession() as http:
            rss_before = rss_kib(proc.pid)
            before = await gauges(http, url)
            stop = asyncio.Event()
            faults: Counter[str] = Counter()
            injector = asyncio.create_task(inject(
                http, cluster.prefill_urls, cluster.decode_urls, args.fault_every,
                args.fault_hold, stop, faults)) if args.faults else None
            started = time.monotonic()
            result = await run(LoadConfig(url=url, mix="input-heavy", rate=args.rate,
                                          duration_s=args.duration, seed=3, timeout_s=60),
                               progress=not args.quiet)
            elapsed = time.monotonic() - started
            stop.set()
            if injector is not None:
                await injector
            await asyncio.sleep(1.0)
            after = await gauges(http, url)
            rss_after = rss_kib(proc.pid)
        proc.terminate()
        await proc.wait()

    s = result.summary
    statuses = Counter(
        "ok" if r.ok else f"{r.status or 'no status'}: {(r.error or '?')[:48]}"
        for r in result.records)
    rejected = sum(n for k, n in statuses.items() if k in ("429", "503"))
    hung = sum(1 for r in result.records if r.error and "timeout" in r.error.lower())
    print(f"\nsoak: {elapsed:.0f} s at {args.rate:g} req/s (input-heavy), faults: "
          f"{dict(faults) or 'off'}")
    print(f"  sent {len(result.records)}  completed {s['completed']}  rejected {rejected}"
          f"  failed {s['failed'] - rejected}  hung {hung}")
    print("  how requests ended:")
    for key, n in statuses.most_common():
        print(f"    {n:6d}  {key}")
    for key in ("ttft_ms", "itl_ms", "e2el_ms"):
        q = s[key]
        print(f"  {key:8s} p50 {q['p50']:.1f}  p99 {q['p99']:.1f}  max {q['max']:.1f}")
    print(f"  pdlb RSS before {rss_before / 1024:.1f} MiB, after {rss_after / 1024:.1f} MiB")
    print(f"  in-flight gauges before {before}")
    print(f"  in-flight gauges after  {after}")
    leaked = any(after.values())
    if leaked:
        print("  !! pdlb's in-flight counters are not back to zero")
    return 1 if leaked or hung else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=300.0)
    p.add_argument("--rate", type=float, default=6.0,
                   help="req/s (default 6 ≈ 80 %% of the 2P+2D emulated pool on this mix)")
    p.add_argument("--fault-every", type=float, default=10.0)
    p.add_argument("--fault-hold", type=float, default=4.0)
    p.add_argument("--no-faults", dest="faults", action="store_false")
    p.add_argument("--quiet", action="store_true")
    sys.exit(asyncio.run(main(p.parse_args())))
