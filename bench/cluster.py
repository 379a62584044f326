"""Shared budgets on Redis ([cluster]): what they add per request, and how far N replicas
over-admit, against one pdlb with no cluster.

    .venv/bin/python bench/cluster.py              # ~1 min; needs redis-server
    .venv/bin/python bench/cluster.py --replicas 1,2,4 --seconds 5

1. admission micro: one ``Admission.admit`` + release, in process, without a store and with
   ``RedisBudgets`` on a local redis-server (loopback): µs per admit (p50, p99), as many
   other live leases as replicas (the script sums them), and one shared-loads round.
2. end to end: 1 prefill + 1 decode emulator (``--time-scale``, default 1000), and R
   ``pdlb serve`` processes sharing one Redis (R in ``--replicas``), next to one pdlb
   without [cluster]: ``--clients`` closed-loop clients spread over the replicas, short
   requests (128-token prompt, 4 new tokens) with budgets that never fill: client-seen
   latency p50 / p90 and requests/s.
3. over-admission: the same fleets with a 20,000-token decode budget and slow 2,000-token
   requests flooding every replica: the largest sampled sum of the replicas'
   ``pdlb_admitted_tokens{stage="decode"}`` minus the budget (one request = 2,000).

4. ``--balance``: 1 prefill + 2 decode emulators (real time), 3 replicas with least_tokens
   on decode, flooded by 24 clients with mixed sizes (max_tokens 50 or 1,000): the mean
   imbalance |a - b| / (a + b) of the two decode backends' in-flight tokens (summed over the
   replicas, sampled every 50 ms), with ``share_loads`` off, and on at 100 ms and 10 ms.

Every process shares this machine's cores with the others (2 cores here): the end-to-end
numbers include that contention; compare rows of one run, not across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aiohttp

from emulator import EmulatorCluster
from lb.admission import Admission
from lb.backends.cluster import RedisBudgets
from lb.backends.pool import Pool
from lb.backends.shared_loads import SharedLoads
from lb.config import ClusterConfig, parse_config
from lb.metrics import Metrics
from policies.registry import build_policy

ADMITTED = re.compile(rb'^pdlb_admitted_tokens\{stage="decode"\} ([0-9.e+-]+)$', re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server(workdir: Path):  # type: ignore[no-untyped-def]
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def micro(url: str, n: int, others: int) -> dict[str, float]:
    config = parse_config({"pools": {"prefill": {"backends": ["http://127.0.0.1:1"]},
                                     "decode": {"backends": ["http://127.0.0.1:2"],
                                                "max_inflight_tokens": 10**9}}}, "<bench>")
    out: dict[str, float] = {}
    plain = Admission(config.pools, Metrics())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        ticket = await plain.admit(100, 200)
        times.append(time.perf_counter() - t0)
        ticket.release()
    out["local_p50_us"], out["local_p99_us"] = pct(times, 0.5) * 1e6, pct(times, 0.99) * 1e6
    stores = [RedisBudgets(ClusterConfig(redis_url=url, replicas=others + 1), Metrics())
              for _ in range(others + 1)]
    for s in stores:
        await s.start()
    try:
        shared = Admission(config.pools, Metrics(), stores[0])
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            ticket = await shared.admit(100, 200)
            times.append(time.perf_counter() - t0)
            ticket.release()
            await asyncio.sleep(0)  # let the batched release go out
        out["redis_p50_us"], out["redis_p99_us"] = pct(times, 0.5) * 1e6, pct(times, 0.99) * 1e6
        pools = {name: Pool(pc, build_policy("least_tokens", {}, pool=name), Metrics())
                 for name, pc in config.pools.items()}
        loads = SharedLoads(stores[0], pools, 1.0)
        times = []
        for _ in range(max(50, n // 10)):
            t0 = time.perf_counter()
            await loads.once()
            times.append(time.perf_counter() - t0)
        out["loads_round_p50_us"] = pct(times, 0.5) * 1e6
    finally:
        for s in stores:
            await s.stop()
    return out


def pdlb_config(prefill: str, decode: str, redis_url: str | None, replicas: int,
                budget: int, cluster_extra: str = "") -> str:
    decodes = ", ".join(f'"{u}"' for u in decode.split(","))
    text = f"""
[pools.prefill]
backends = ["{prefill}"]
[pools.decode]
backends = [{decodes}]
max_inflight_tokens = {budget}
max_queue = 1000
queue_timeout_s = 60
[log]
access = false
"""
    if redis_url is not None:
        text += (f'[cluster]\nredis_url = "{redis_url}"\nreplicas = {replicas}\n'
                 + cluster_extra)
    return text


@contextlib.asynccontextmanager
async def fleet(config: Path, count: int) -> AsyncIterator[list[str]]:
    procs = []
    urls = []
    try:
        for _ in range(count):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lb.cli", "serve", "--config", str(config), "--port", "0",
                "--log-level", "warning", stdout=asyncio.subprocess.PIPE)
            procs.append(proc)
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            if not line.startswith("pdlb listening on "):
                raise RuntimeError(f"pdlb did not start: {line!r}")
            urls.append(line.split()[-1])
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            await proc.wait()


async def closed_loop(http: aiohttp.ClientSession, urls: list[str], clients: int,
                      seconds: float, prompt: int, max_tokens: int) -> list[float]:
    latencies: list[float] = []
    until = time.monotonic() + seconds

    async def one(i: int) -> None:
        url = urls[i % len(urls)] + "/v1/completions"
        body = {"model": "emulated-model", "prompt": [10 + (i * 7 + j) % 9000
                                                      for j in range(prompt)],
                "max_tokens": max_tokens, "ignore_eos": True}
        while time.monotonic() < until:
            t0 = time.perf_counter()
            async with http.post(url, json=body) as resp:
                await resp.read()
                if resp.status == 200:
                    latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(i) for i in range(clients)))
    return latencies


async def max_admitted(http: aiohttp.ClientSession, urls: list[str], stop: asyncio.Event
                       ) -> int:
    best = 0
    while not stop.is_set():
        total = 0
        for url in urls:
            async with http.get(url + "/metrics") as resp:
                m = ADMITTED.search(await resp.read())
                total += int(float(m.group(1))) if m else 0
        best = max(best, total)
        await asyncio.sleep(0.05)
    return best


async def end_to_end(args: argparse.Namespace, redis_url: str, workdir: Path) -> None:
    counts = [int(c) for c in args.replicas.split(",")]
    async with EmulatorCluster(prefill=1, decode=1, mode="subprocess", seed=1,
                               time_scale=args.time_scale) as fast, \
            EmulatorCluster(prefill=1, decode=1, mode="subprocess", seed=2) as slow, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        print("\n2. end to end (short requests, budgets never full) and"
              " 3. over-admission (20,000 budget, 2,000-token requests)")
        print(f"{'setup':<22} {'p50 ms':>8} {'p90 ms':>8} {'req/s':>7} {'max admitted':>13}"
              f" {'over budget':>12}")
        for label, count, cluster in [("1 pdlb, no cluster", 1, False),
                                      *((f"{c} pdlb, Redis", c, True) for c in counts)]:
            url = redis_url if cluster else None
            config = workdir / f"fast-{count}-{cluster}.toml"
            config.write_text(pdlb_config(fast.prefill_urls[0], fast.decode_urls[0], url,
                                          count, 10**9))
            async with fleet(config, count) as urls:
                await closed_loop(http, urls, args.clients, 1.0, 128, 4)  # warm-up
                lat = await closed_loop(http, urls, args.clients, args.seconds, 128, 4)
            config = workdir / f"slow-{count}-{cluster}.toml"
            config.write_text(pdlb_config(slow.prefill_urls[0], slow.decode_urls[0], url,
                                          count, 20_000))
            async with fleet(config, count) as urls:
                stop = asyncio.Event()
                sampler = asyncio.ensure_future(max_admitted(http, urls, stop))
                await closed_loop(http, urls, 24, args.seconds, 1850, 150)
                stop.set()
                peak = await sampler
            print(f"{label:<22} {statistics.median(lat) * 1e3:>8.2f}"
                  f" {pct(lat, 0.9) * 1e3:>8.2f} {len(lat) / args.seconds:>7.0f}"
                  f" {peak:>13} {peak - 20_000:>12}")


INFLIGHT = re.compile(rb'^pdlb_backend_inflight_tokens\{backend="([^"]+)",pool="decode"\}'
                      rb' ([0-9.e+-]+)$', re.M)


async def balance(args: argparse.Namespace, redis_url: str, workdir: Path) -> None:
    print("\n4. balance of 2 decode backends under 3 replicas (least_tokens), mixed sizes")
    print(f"{'share_loads':<22} {'mean imbalance':>15} {'samples':>8}")
    async with EmulatorCluster(prefill=1, decode=2, mode="subprocess", seed=4) as emus, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        for label, extra in [("off", "share_loads = false\n"),
                             ("on, 100 ms", "load_interval_ms = 100\n"),
                             ("on, 10 ms", "load_interval_ms = 10\n")]:
            config = workdir / f"balance-{len(extra)}.toml"
            config.write_text(pdlb_config(emus.prefill_urls[0], ",".join(emus.decode_urls),
                                          redis_url, 3, 10**9, extra))
            async with fleet(config, 3) as urls:
                stop = asyncio.Event()
                ratios: list[float] = []

                async def sample(urls: list[str] = urls, ratios: list[float] = ratios,
                                 stop: asyncio.Event = stop) -> None:
                    while not stop.is_set():
                        per: dict[bytes, float] = {}
                        for url in urls:
                            async with http.get(url + "/metrics") as resp:
                                for m in INFLIGHT.finditer(await resp.read()):
                                    per[m.group(1)] = per.get(m.group(1), 0) + float(m.group(2))
                        if len(per) == 2 and sum(per.values()) > 0:
                            a, b = per.values()
                            ratios.append(abs(a - b) / (a + b))
                        await asyncio.sleep(0.05)

                sampler = asyncio.ensure_future(sample())
                until = time.monotonic() + args.seconds

                async def client(i: int, urls: list[str] = urls, until: float = until) -> None:
                    n = 0
                    while time.monotonic() < until:
                        n += 1
                        body = {"model": "emulated-model", "prompt": [10 + i, 20 + n],
                                "max_tokens": 1000 if (i * 7 + n) % 5 == 0 else 50,
                                "ignore_eos": True}
                        async with http.post(urls[i % 3] + "/v1/completions", json=body) as r:
                            await r.read()

                await asyncio.gather(*(client(i) for i in range(24)))
                stop.set()
                await sampler
            print(f"{label:<22} {statistics.mean(ratios):>15.3f} {len(ratios):>8}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--time-scale", type=float, default=1000.0,
                        help="the fast emulators' speed-up (high: pdlb's own cost shows)")
    parser.add_argument("--n", type=int, default=2000, help="admissions per micro row")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--balance", action="store_true", help="run section 4 only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, redis_server(Path(tmp)) as url:
        if args.balance:
            await balance(args, url, Path(tmp))
            return
        print("1. admission micro (in process, loopback redis-server)")
        print(f"{'live leases':>11} {'local p50/p99 us':>17} {'redis p50/p99 us':>17}"
              f" {'loads round p50 us':>19}")
        for others in (0, 1, 3):
            r = await micro(url, args.n, others)
            print(f"{others + 1:>11} {r['local_p50_us']:>8.1f}/{r['local_p99_us']:<8.1f}"
                  f" {r['redis_p50_us']:>8.1f}/{r['redis_p99_us']:<8.1f}"
                  f" {r['loads_round_p50_us']:>19.1f}")
        if not args.skip_e2e:
            await end_to_end(args, url, Path(tmp))


if __name__ == "__main__":
    asyncio.run(main())
