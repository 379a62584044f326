"""``pdlb demo`` — disaggregated (through pdlb) vs colocated, on emulated vLLM, no GPU.

Starts, as separate processes: an emulated prefill pool and decode pool (NIXL pull handshake,
H100-class performance model), a colocated pool of the same total size (``--role both``:
prefill chunks and decode steps share one engine loop), and two pdlb instances — one in front
of the PD pools, one balancing the colocated pool (``direct_decode_below_tokens`` makes every
request skip the prefill hop, so both sides pay the same proxy cost). Then it drives both with
the same seeded input-heavy workload, one after the other, and prints TTFT / ITL / TPOT
percentiles, throughput and goodput under an SLO side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pdlb demo",
        description="PD disaggregation through pdlb vs a colocated pool, on the emulator.",
    )
    p.add_argument("--prefill", type=int, default=2, help="emulated prefill servers (default 2)")
    p.add_argument("--decode", type=int, default=2, help="emulated decode servers (default 2)")
    p.add_argument("--rate", type=float, default=7.0, help="requests/s, Poisson (default 7)")
    p.add_argument("--duration", type=float, default=20.0,
                   help="seconds of load per side (default 20)")
    p.add_argument("--mix", default="input-heavy", help="loadgen workload mix")
    p.add_argument("--slo", default="ttft:2000,tpot:15",
                   help="SLO for goodput, loadgen syntax (default ttft:2000,tpot:15: an"
                        " interactive stream of at least ~65 tokens/s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", help="folder for the two result JSON files (default: a temp dir)")
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    return p


def _toml(prefill: list[str], decode: list[str], *, colocated: bool) -> str:
    lines = [
        "[server]", 'host = "127.0.0.1"', "port = 0",
        "[pools.prefill]", 'policy = "least_tokens"',
        "backends = [" + ", ".join(f'{{ url = "{u}" }}' for u in prefill) + "]",
        "[pools.decode]", 'policy = "least_tokens"',
        "backends = [" + ", ".join(f'{{ url = "{u}" }}' for u in decode) + "]",
        "[health]", "interval_s = 1.0",
    ]
    if colocated:
        lines += ["[resilience]", "direct_decode_below_tokens = 100000000"]
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def _pdlb(config_path: Path) -> AsyncIterator[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lb.cli", "serve", "--config", str(config_path),
        "--log-level", "warning", stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
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


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _run(args: argparse.Namespace) -> int:
    from emulator.cluster import EmulatorCluster
    from loadgen import SLO, LoadConfig, render_side_by_side, run

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="pdlb-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    total = args.prefill + args.decode
    started = time.monotonic()
    _say(f"pdlb demo: starting {args.prefill} prefill + {args.decode} decode emulated servers"
         f" and a colocated pool of {total} ...")
    async with EmulatorCluster(prefill=args.prefill, decode=args.decode, both=total,
                               mode="subprocess", seed=args.seed) as cluster:
        pd_cfg = out / "pd.toml"
        pd_cfg.write_text(_toml(cluster.prefill_urls, cluster.decode_urls, colocated=False))
        co_cfg = out / "colocated.toml"
        co_cfg.write_text(_toml(cluster.both_urls[:1], cluster.both_urls, colocated=True))
        results = []
        async with _pdlb(pd_cfg) as pd_url, _pdlb(co_cfg) as co_url:
            _say(f"  emulators up; pdlb (PD) at {pd_url}, pdlb (colocated) at {co_url}"
                 f" [{time.monotonic() - started:.1f} s]")
            for label, url in ((f"PD {args.prefill}P+{args.decode}D via pdlb", pd_url),
                               (f"colocated {total}x both", co_url)):
                _say(f"  driving {label}: {args.mix}, {args.rate:g} req/s Poisson for"
                     f" {args.duration:g} s ...")
                config = LoadConfig(
                    url=url, mix=args.mix, rate=args.rate, duration_s=args.duration,
                    seed=args.seed, slo=SLO.parse(args.slo), label=label,
                    scrape_metrics=label.startswith("PD"),
                )
                result = await run(config, progress=not args.quiet)
                result.write(out / f"{'pd' if label.startswith('PD') else 'colocated'}.json")
                results.append(result)
    print()
    print(render_side_by_side(results))
    print()
    _print_verdict(results)
    print(f"\nresults: {out}/pd.json, {out}/colocated.json"
          f"  (recompute or compare: pdlb loadgen compare {out}/pd.json {out}/colocated.json)")
    _say(f"pdlb demo: done in {time.monotonic() - started:.0f} s")
    failed = sum(r.summary.get("failed", 0) for r in results)
    return 1 if failed and all(r.summary.get("completed", 0) == 0 for r in results) else 0


def _p(summary: dict[str, Any], key: str, stat: str) -> float:
    value = (summary.get(key) or {}).get(stat)
    return float(value) if isinstance(value, int | float) else float("nan")


def _print_verdict(results: Sequence[Any]) -> None:
    pd, co = results[0].summary, results[1].summary
    print("What to look at:")
    print(f"  ITL p99  PD {_p(pd, 'itl_ms', 'p99'):.1f} ms vs colocated"
          f" {_p(co, 'itl_ms', 'p99'):.1f} ms, TPOT p99 {_p(pd, 'tpot_ms', 'p99'):.1f} vs"
          f" {_p(co, 'tpot_ms', 'p99'):.1f} ms — in the colocated pool every long prefill"
          " stalls the decodes running beside it.")
    print(f"  TTFT p50 PD {_p(pd, 'ttft_ms', 'p50'):.1f} ms vs colocated"
          f" {_p(co, 'ttft_ms', 'p50'):.1f} ms — PD pays one extra hop and a KV transfer.")
    for name, s in (("PD", pd), ("colocated", co)):
        if "goodput" in s:
            print(f"  {name}: goodput {s['goodput']:.2f} req/s,"
                  f" SLO attainment {100 * s.get('slo_attainment', 0):.0f} %")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import uvloop

        return uvloop.run(_run(args))
    except ImportError:  # pragma: no cover
        return asyncio.run(_run(args))
