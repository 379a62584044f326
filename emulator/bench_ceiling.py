"""Measure one emulator process's ceiling: streamed tokens per second it can serve.

    python -m emulator.bench_ceiling [--concurrency 128] [--duration 10] [--max-tokens 256]
                                     [--time-scale 1000]

Starts one ``python -m emulator --role both`` process (its own core), then drives it from
this process with ``--concurrency`` streaming requests kept in flight for ``--duration``
seconds. With a large time scale the performance model asks for far more tokens than any
Python process can send, so what comes out is the CPU ceiling of the emulator (one event
loop). It prints tokens/s received, the emulator's CPU use (from /proc), and how far the
engine's model clock kept up with wall time x time_scale (1.0 = it kept up).

The client only counts SSE events per network read (no JSON parsing); on a 2-core box the
client and the emulator each get about one core.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass

import aiohttp

from emulator.cluster import EmulatorCluster


@dataclass
class Tally:
    events: int = 0
    done: int = 0
    failed: int = 0


async def _stream_forever(session: aiohttp.ClientSession, url: str, body: dict[str, object],
                          stop_at: float, tally: Tally) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < stop_at:
        try:
            async with session.post(url, json=body) as resp:
                if resp.status != 200:
                    tally.failed += 1
                    await resp.read()
                    continue
                async for data in resp.content.iter_any():
                    tally.events += data.count(b"data: ")
            tally.done += 1
        except aiohttp.ClientError:
            tally.failed += 1


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(concurrency: int, duration: float, max_tokens: int, time_scale: float,
              prompt_tokens: int) -> dict[str, float]:
    async with EmulatorCluster(both=1, mode="subprocess", time_scale=time_scale,
                               max_num_seqs=max(concurrency, 1)) as cluster:
        url = cluster.both_urls[0]
        pid = cluster.processes[0].pid
        body = {"prompt": list(range(1000, 1000 + prompt_tokens)), "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True}
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get(url + "/_emulator/state") as resp:
                model0 = (await resp.json())["model_time_s"]
            tally = Tally()
            loop = asyncio.get_running_loop()
            cpu0, t0, mine0 = _cpu_seconds(pid), time.perf_counter(), time.process_time()
            stop_at = loop.time() + duration
            await asyncio.gather(*(
                _stream_forever(session, url + "/v1/completions", body, stop_at, tally)
                for _ in range(concurrency)
            ))
            wall = time.perf_counter() - t0
            cpu = _cpu_seconds(pid) - cpu0
            mine = time.process_time() - mine0
            async with session.get(url + "/_emulator/state") as resp:
                model1 = (await resp.json())["model_time_s"]
    # Events include the usage-less final chunk count exactly once per token (no role chunk
    # for completions), so events = tokens.
    return {
        "tokens_per_s": tally.events / wall,
        "requests_done": tally.done,
        "requests_failed": tally.failed,
        "wall_s": wall,
        "emulator_cpu_pct": 100.0 * cpu / wall,
        "tokens_per_cpu_s": tally.events / cpu if cpu > 0 else float("nan"),
        "client_cpu_pct": 100.0 * mine / wall,
        "model_clock_kept_up": (model1 - model0) / (wall * time_scale),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulator.bench_ceiling",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--time-scale", type=float, default=1000.0)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.concurrency, args.duration, args.max_tokens,
                             args.time_scale, args.prompt_tokens))
    print(f"concurrency={args.concurrency} max_tokens={args.max_tokens} "
          f"time_scale={args.time_scale} duration={result['wall_s']:.1f}s")
    print(f"  streamed tokens/s : {result['tokens_per_s']:.0f}")
    print(f"  requests done     : {result['requests_done']:.0f} "
          f"(failed {result['requests_failed']:.0f})")
    print(f"  emulator CPU      : {result['emulator_cpu_pct']:.0f}% of one core "
          f"(this client: {result['client_cpu_pct']:.0f}%)")
    print(f"  tokens per emulator CPU-second: {result['tokens_per_cpu_s']:.0f} "
          "(the ceiling of one unshared core; robust when other work shares the box)")
    print(f"  model clock kept up: {result['model_clock_kept_up']:.3f} "
          "(1.0 = wall x time_scale; below 1 = the emulator is the bottleneck)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
