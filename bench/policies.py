"""Does the prefill routing policy matter? Compare policies on emulated PD pools.

Starts 4 prefill + 4 decode emulated vLLM servers (``emulator``, one process each), then for
every policy: resets the emulators (empty prefix caches), starts pdlb in its own process
with that policy on the prefill pool (decode: ``least_tokens`` throughout), and drives a
shared-prefix workload with the load generator (``loadgen``: N system prompts, each shared
by many questions, Poisson arrivals). While it runs, pdlb's ``/metrics`` is sampled every
100 ms for the per-backend in-flight tokens. Printed per policy:

* prefix-cache hit rate of the prefill pool: Δ ``vllm:prefix_cache_hits`` / Δ
  ``vllm:prefix_cache_queries``, summed over the prefill emulators;
* TTFT p50 / p99 (loadgen, vLLM ``bench serve`` definitions);
* load imbalance: max / mean of ``pdlb_backend_inflight_tokens`` across a pool's backends,
  as Σ max / Σ mean over the samples (1.00 = perfectly even; 4.00 = all on one of four),
  prefill and decode;
* the load generator's p99 schedule lag: above a few ms the machine was starved of CPU
  during that run (other work on it), and its latencies say more about that than about the
  policy — rerun it.

The prefix working set (groups × prefix tokens) is made larger than one prefill server's
KV cache but smaller than the four together: the case where routing decides whether the
caches hold the prefixes at all.

    python bench/policies.py                      # ~100 s: 4 policies × 20 s + start-up
    python bench/policies.py --duration 10 --policies round_robin,prefix_affinity
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp

DEFAULT_POLICIES = "round_robin,least_tokens,prefix_affinity,score"
_SAMPLE = re.compile(r'^([\w:]+)\{([^}]*)\} ([0-9.eE+-]+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/policies.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default=DEFAULT_POLICIES,
                   help=f"prefill policies, comma-separated (default {DEFAULT_POLICIES})")
    p.add_argument("--policy", action="append", default=[], metavar="NAME[:K=V;K=V]",
                   help="a prefill policy with options as TOML values (repeatable; replaces"
                        " --policies), e.g. 'score:weights={load = 2};load_factor=1.5'")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per policy")
    p.add_argument("--rate", type=float, default=16.0, help="requests/s (Poisson)")
    p.add_argument("--groups", type=int, default=48, help="shared system prompts")
    p.add_argument("--prefix-len", type=int, default=2048, help="tokens per system prompt")
    p.add_argument("--input-len", type=int, default=256, help="tokens per question")
    p.add_argument("--output-len", type=int, default=32, help="tokens generated per request")
    p.add_argument("--prefill-kv-tokens", type=int, default=50_000,
                   help="KV-cache size of each prefill emulator, in tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out.append((m[1], dict(_LABEL.findall(m[2])), float(m[3])))
    return out


async def _get(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as resp:
        return await resp.text()


async def _cache_counters(http: aiohttp.ClientSession, urls: Sequence[str]) -> tuple[float, float]:
    """Σ vllm:prefix_cache_hits and Σ vllm:prefix_cache_queries over ``urls``."""
    hits = queries = 0.0
    for text in await asyncio.gather(*(_get(http, u + "/metrics") for u in urls)):
        for name, _, value in _samples(text):
            if name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits"):
                hits += value
            elif name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries"):
                queries += value
    return hits, queries


class ImbalanceSampler:
    """Samples pdlb's per-backend in-flight tokens. Imbalance of a pool = Σ max / Σ mean over
    the samples (the max/mean of one sample, weighted by its load: moments with many tokens
    in flight count more than nearly idle ones, where max/mean is mostly noise)."""

    def __init__(self, http: aiohttp.ClientSession, pdlb_url: str, every_s: float = 0.1):
        self.http, self.url, self.every_s = http, pdlb_url + "/metrics", every_s
        self.sums: dict[str, list[float]] = {"prefill": [0.0, 0.0], "decode": [0.0, 0.0]}

    async def run(self) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                per_pool: dict[str, list[float]] = {"prefill": [], "decode": []}
                for name, labels, value in _samples(await _get(self.http, self.url)):
                    if name == "pdlb_backend_inflight_tokens" and labels.get("pool") in per_pool:
                        per_pool[labels["pool"]].append(value)
                for pool, values in per_pool.items():
                    if values:
                        self.sums[pool][0] += max(values)
                        self.sums[pool][1] += sum(values) / len(values)
            await asyncio.sleep(self.every_s)

    def imbalance(self, pool: str) -> float:
        top, mean = self.sums[pool]
        return top / mean if mean > 0 else float("nan")


def _toml(prefill: Sequence[str], decode: Sequence[str], spec: str) -> str:
    """backends.toml for one run; ``spec`` is ``name`` or ``name:key=value;key=value``."""
    def urls(us: Sequence[str]) -> str:
        return "[" + ", ".join(f'"{u}"' for u in us) + "]"

    name, _, options = spec.partition(":")
    lines = [
        "[server]", 'host = "127.0.0.1"', "port = 0",
        "[health]", "interval_s = 1.0",
        "[scrape]", "interval_s = 1.0",
        "[pools.decode]", f"backends = {urls(decode)}", 'policy = "least_tokens"',
        "[pools.prefill]", f"backends = {urls(prefill)}", f'policy = "{name}"',
        "[pools.prefill.policy_options]",
        *(o.strip() for o in options.split(";") if o.strip()),
    ]
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def _pdlb(config_path: Path) -> AsyncIterator[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lb.cli", "serve", "--config", str(config_path),
        "--log-level", "warning", stdout=asyncio.subprocess.PIPE,
    )
    try:
        if proc.stdout is None:
            raise RuntimeError("no stdout pipe to pdlb")
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


async def _one_policy(args: argparse.Namespace, policy: str, prefill: Sequence[str],
                      decode: Sequence[str], workdir: Path,
                      http: aiohttp.ClientSession) -> dict[str, Any]:
    from loadgen import LengthDist, LoadConfig, run

    for url in (*prefill, *decode):
        async with http.post(url + "/_emulator/reset") as resp:
            resp.raise_for_status()
    hits0, queries0 = await _cache_counters(http, prefill)
    config_path = workdir / "backends.toml"
    config_path.write_text(_toml(prefill, decode, policy))
    async with _pdlb(config_path) as url:
        sampler = ImbalanceSampler(http, url)
        task = asyncio.create_task(sampler.run())
        try:
            result = await run(LoadConfig(
                url=url, endpoint="completions", rate=args.rate, duration_s=args.duration,
                prefix_groups=args.groups, prefix_len=args.prefix_len, questions_per_group=1000,
                input_len=LengthDist(args.input_len), output_len=LengthDist(args.output_len),
                seed=args.seed, preflight=False, label=policy,
            ))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    hits1, queries1 = await _cache_counters(http, prefill)
    summary = result.summary
    ttft = summary.get("ttft_ms") or {}
    return {
        "policy": policy,
        "completed": summary.get("completed", 0),
        "failed": summary.get("failed", 0),
        "hit_rate": (hits1 - hits0) / (queries1 - queries0) if queries1 > queries0 else 0.0,
        "ttft_p50": ttft.get("p50"),
        "ttft_p99": ttft.get("p99"),
        "imbalance_prefill": sampler.imbalance("prefill"),
        "imbalance_decode": sampler.imbalance("decode"),
        "throughput": summary.get("request_throughput"),
        "lag_p99": (summary.get("schedule_lag_ms") or {}).get("p99"),
    }


def _table(rows: Sequence[dict[str, Any]]) -> str:
    def ms(v: Any) -> str:
        return f"{v:.0f}" if isinstance(v, int | float) else "-"

    lines = [
        "| prefill policy | done/failed | req/s | prefix-cache hit rate | TTFT p50 ms "
        "| TTFT p99 ms | imbalance prefill (max/mean) | imbalance decode "
        "| loadgen lag p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['completed']}/{r['failed']} | {r['throughput'] or 0:.1f} "
            f"| {r['hit_rate']:.1%} | {ms(r['ttft_p50'])} | {ms(r['ttft_p99'])} "
            f"| {r['imbalance_prefill']:.2f} | {r['imbalance_decode']:.2f} "
            f"| {r['lag_p99'] or 0:.1f} |"
        )
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> int:
    from emulator.cluster import EmulatorCluster

    policies = args.policy or [p.strip() for p in args.policies.split(",") if p.strip()]
    started = time.monotonic()
    _say(args, "bench/policies: starting 4 prefill + 4 decode emulators ...")
    rows = []
    async with (
        EmulatorCluster(prefill=4, mode="subprocess", seed=args.seed,
                        kv_capacity_tokens=args.prefill_kv_tokens) as prefills,
        EmulatorCluster(decode=4, mode="subprocess", seed=args.seed) as decodes,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
    ):
        with tempfile.TemporaryDirectory(prefix="pdlb-bench-") as tmp:
            for policy in policies:
                _say(args, f"  {policy}: {args.rate:g} req/s for {args.duration:g} s"
                     f" [{time.monotonic() - started:.0f} s]")
                rows.append(await _one_policy(args, policy, prefills.prefill_urls,
                                              decodes.decode_urls, Path(tmp), http))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"4 prefill + 4 decode emulators (prefill KV {args.prefill_kv_tokens} tokens each);"
          f" {args.groups} system prompts x {args.prefix_len} tokens + {args.input_len}-token"
          f" questions, {args.output_len} output tokens; Poisson {args.rate:g} req/s for"
          f" {args.duration:g} s per policy; decode pool: least_tokens;"
          f" {os.cpu_count()} CPUs, load average {load}")
    print(_table(rows))
    _say(args, f"bench/policies: done in {time.monotonic() - started:.0f} s")
    return 1 if any(r["completed"] == 0 for r in rows) else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
