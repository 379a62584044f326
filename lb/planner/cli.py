"""``pdlb plan`` (how many prefill and decode servers) and ``pdlb plan profile`` (measure one
of each). See docs/planner.md."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from lb.planner.model import SLOTarget

EXAMPLES = """\
examples:
  pdlb plan profile --emulate --out profile.json
  pdlb plan profile --prefill http://10.0.0.1:8100 --decode http://10.0.0.2:8200 --out p.json
  pdlb plan --profile profile.json --mix input-heavy --slo ttft:1000,tpot:50 --rate 20
  pdlb plan --emulator-profile --access-log access.json --slo ttft:800,tpot:40 \\
      --rates 5,10,20 --no-simulate --plot plan.png
"""


def _knobs(pairs: Sequence[str]) -> dict[str, Any]:
    """``name=value`` EmulatorConfig knobs (values parsed as JSON numbers/booleans)."""
    from emulator.config import EmulatorConfig

    fields = set(EmulatorConfig.__dataclass_fields__)
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"bad emulator knob {pair!r}: expected NAME=VALUE with NAME an"
                             " EmulatorConfig field (see `pdlb emulate --help`)")
        try:
            out[name] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            out[name] = raw
    return out


def _rates(args: argparse.Namespace, observed: float | None) -> list[float]:
    if args.rates:
        rates = [float(x) for x in args.rates.split(",") if x.strip()]
    elif args.rate_range:
        lo_s, hi_s, n_s = [*args.rate_range.split(":"), "5"][:3]
        lo, hi, n = float(lo_s), float(hi_s), int(n_s)
        if n < 2 or not hi > lo:
            raise ValueError("--rate-range LO:HI[:N] needs HI > LO and N >= 2")
        rates = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    elif args.rate is not None:
        rates = [args.rate]
    elif observed is not None:
        rates = [observed]
    else:
        raise ValueError("give --rate, --rates or --rate-range (an access log's own rate is"
                         " used when none is given)")
    if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
        raise ValueError(f"rates must be positive numbers of requests/s, got {rates}")
    return rates


def _slo(spec: str, percentile: float) -> SLOTarget:
    from loadgen.metrics import SLO

    slo = SLO.parse(spec)
    if slo.ttft_ms is None or slo.tpot_ms is None:
        raise ValueError(f"--slo {spec!r}: the planner needs both ttft:MS and tpot:MS")
    if not 0 < percentile < 100:
        raise ValueError(f"--percentile {percentile}: must be in (0, 100)")
    return SLOTarget(slo.ttft_ms, slo.tpot_ms, percentile)


def plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pdlb plan", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The smallest prefill:decode fleet (and colocated fleet) that meets a"
                    " TTFT/TPOT SLO at each rate, checked on an emulator fleet.")
    cap = p.add_mutually_exclusive_group(required=True)
    cap.add_argument("--profile", help="per-server capacity (pdlb plan profile --out)")
    cap.add_argument("--emulator-profile", nargs="*", metavar="KNOB=VALUE",
                     help="capacity of an emulator with these knobs (none: its defaults)")
    wl = p.add_mutually_exclusive_group(required=True)
    wl.add_argument("--mix", help="a loadgen mix: input-heavy, output-heavy, chat")
    wl.add_argument("--input-len", help="prompt tokens MEAN or MEAN:STD (with --output-len)")
    wl.add_argument("--dataset", help="a loadgen JSONL or ShareGPT file")
    wl.add_argument("--access-log", help="pdlb's JSON access log ([log] format = \"json\")")
    p.add_argument("--output-len", help="output tokens MEAN or MEAN:STD")
    p.add_argument("--slo", required=True, help="ttft:MS,tpot:MS")
    p.add_argument("--percentile", type=float, default=90.0,
                   help="the SLO holds for this percentile of requests (default 90)")
    p.add_argument("--rate", type=float, help="requests/s")
    p.add_argument("--rates", help="comma-separated requests/s")
    p.add_argument("--rate-range", help="LO:HI[:N] requests/s, N points (default 5)")
    p.add_argument("--max-servers", type=int, default=64, help="per pool (default 64)")
    p.add_argument("--samples", type=int, default=2000, help="Monte Carlo draws (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-simulate", action="store_true",
                   help="skip the emulator check (the plan is printed as unverified)")
    p.add_argument("--check-fewer", action="store_true",
                   help="also simulate one server fewer in the binding pool")
    p.add_argument("--check-colocated", action="store_true",
                   help="also simulate the colocated fleet")
    p.add_argument("--sim-duration", type=float, default=60.0,
                   help="model seconds of load per simulation (default 60)")
    p.add_argument("--sim-time-scale", type=float, default=1.0,
                   help="emulator time scale for the simulation (default 1)")
    p.add_argument("--plot", help="write a PNG (needs pdlb[plots])")
    p.add_argument("--json", help="write the plan as JSON")
    return p


def profile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pdlb plan profile", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure one prefill and one decode server (or emulate a pair) and write"
                    " the capacity profile pdlb plan reads.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prefill", help="a prefill server's base URL (with --decode)")
    src.add_argument("--emulate", nargs="*", metavar="KNOB=VALUE",
                     help="start an emulated prefill+decode pair with these knobs and measure"
                          " it")
    p.add_argument("--decode", help="a decode server's base URL")
    p.add_argument("--out", required=True, help="the profile JSON to write")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="measured seconds x this (an emulator run with --time-scale)")
    p.add_argument("--kv-capacity-tokens", type=int,
                   help="decode KV capacity (default: from the server's /metrics)")
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--kv-bandwidth-gb-s", type=float, default=25.0)
    p.add_argument("--kv-latency-ms", type=float, default=1.5)
    p.add_argument("--kv-bytes-per-token", type=int, default=131_072)
    p.add_argument("--quick", action="store_true", help="a smaller sweep (about half)")
    p.add_argument("--prompt-lengths", help="prefill sweep, comma-separated tokens"
                   " (default 128,512,2048,4096)")
    p.add_argument("--batches", help="prefill batch sizes (default 1,4)")
    p.add_argument("--concurrencies", help="decode sweep, streams (default 1,8,32,64)")
    p.add_argument("--contexts", help="decode sweep, prompt tokens (default 128,1024)")
    p.add_argument("--decode-tokens", type=int, help="tokens per decode stream (default 32)")
    return p


def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"{flag} {text!r}: expected comma-separated positive integers")
    return values


async def _profile(args: argparse.Namespace) -> int:
    from lb.planner.measure import Sweep, profile_servers
    from lb.planner.profile import from_emulator

    sweep = Sweep(max_batched_tokens=args.max_batched_tokens, max_num_seqs=args.max_num_seqs,
                  kv_capacity_tokens=args.kv_capacity_tokens,
                  transfer_latency_ms=args.kv_latency_ms,
                  transfer_bandwidth_gb_s=args.kv_bandwidth_gb_s,
                  kv_bytes_per_token=args.kv_bytes_per_token, time_scale=args.time_scale)
    if args.quick:
        sweep = Sweep(**{**sweep.__dict__, "prompt_lengths": (256, 2048),
                         "concurrencies": (1, 16, 48), "contexts": (128, 768)})
    custom = {k: v for k, v in (
        ("prompt_lengths", _ints(args.prompt_lengths, "--prompt-lengths")),
        ("prefill_batches", _ints(args.batches, "--batches")),
        ("concurrencies", _ints(args.concurrencies, "--concurrencies")),
        ("contexts", _ints(args.contexts, "--contexts")),
        ("decode_tokens", args.decode_tokens)) if v is not None}
    if args.decode_tokens is not None and args.decode_tokens < 4:
        raise ValueError("--decode-tokens must be >= 4")
    sweep = Sweep(**{**sweep.__dict__, **custom})
    if args.emulate is not None:
        from emulator.cluster import EmulatorCluster

        knobs = _knobs(args.emulate)
        truth = from_emulator(knobs)
        sweep = Sweep(**{**sweep.__dict__,
                         "max_batched_tokens": truth.prefill.max_batched_tokens,
                         "max_num_seqs": truth.decode.max_num_seqs,
                         "transfer_latency_ms": truth.transfer.latency_ms,
                         "transfer_bandwidth_gb_s": truth.transfer.bandwidth_gb_s,
                         "kv_bytes_per_token": truth.transfer.bytes_per_token,
                         "block_size": int(truth.emulator["block_size"]),
                         "time_scale": float(knobs.get("time_scale", 1.0))})
        run_knobs = {k: v for k, v in knobs.items() if k != "time_scale"}
        async with EmulatorCluster(prefill=1, decode=1, mode="subprocess",
                                   time_scale=sweep.time_scale, **run_knobs) as c:
            prof = await profile_servers(
                c.prefill_urls[0], c.decode_urls[0], sweep, emulator=truth.emulator,
                source=f"measured on an emulated pair ({truth.source})")
    else:
        if not args.decode:
            raise ValueError("--prefill needs --decode")
        prof = await profile_servers(args.prefill, args.decode, sweep)
    prof.write(args.out)
    pf, dc = prof.prefill, prof.decode
    print(f"profile: {prof.source}")
    print(f"  prefill: {pf.fixed_ms:.1f} ms per step + {pf.tokens_per_s:,.0f} tokens/s"
          f" (saturated {pf.saturated_tokens_per_s:,.0f} tokens/s), {len(pf.points)} points")
    print(f"  decode: ITL = {dc.base_ms:.2f} ms + {dc.per_seq_ms:.3f} ms x running"
          f" + {dc.per_kv_token_us:.4f} us x KV tokens; KV {dc.kv_capacity_tokens:,} tokens,"
          f" {len(dc.points)} points")
    for pt in dc.points:
        pred = dc.itl_s(pt["concurrency"], pt["context"]) * 1e3
        print(f"    n={pt['concurrency']:>4.0f} ctx={pt['context']:>6.0f}: measured"
              f" {pt['itl_ms']:6.2f} ms, fit {pred:6.2f} ms")
    print(f"wrote {args.out}")
    return 0


def _fmt(v: float | None, unit: str = "", digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:,.{digits}f}{unit}"


def _err(pred: float, sim: float) -> str:
    if not (math.isfinite(pred) and math.isfinite(sim)) or sim == 0:
        return "n/a"
    return f"{(pred - sim) / sim:+.0%}"


async def _plan(args: argparse.Namespace) -> int:
    from lb.planner import profile as profiles
    from lb.planner import workload as workloads
    from lb.planner.model import Model
    from lb.planner.search import plan

    slo = _slo(args.slo, args.percentile)
    if args.profile:
        prof = profiles.load(args.profile)
    else:
        prof = profiles.from_emulator(_knobs(args.emulator_profile))
    if args.mix:
        wl = workloads.from_mix(args.mix, samples=args.samples, seed=args.seed)
    elif args.input_len:
        if not args.output_len:
            raise ValueError("--input-len needs --output-len")
        wl = workloads.from_mix(None, input_len=args.input_len, output_len=args.output_len,
                                samples=args.samples, seed=args.seed)
    elif args.dataset:
        wl = workloads.from_dataset(args.dataset, seed=args.seed)
    else:
        wl = workloads.from_access_log(args.access_log)
    rates = _rates(args, wl.observed_rate)
    model = Model(prof, wl, slo, samples=args.samples, seed=args.seed)
    print(f"workload: {wl.describe()}")
    print(f"capacity: {prof.source}")
    print(f"SLO: {slo}\n")
    plans = [plan(model, r, args.max_servers) for r in rates]
    print(table(plans))
    checks: list[dict[str, Any]] = []
    if not args.no_simulate:
        from lb.planner.simulate import simulate

        print()
        for pl in plans:
            if pl.prefill is None or pl.decode is None or pl.pd is None:
                continue
            sim = await simulate(prof, wl, slo, pl.rate, prefill=pl.prefill, decode=pl.decode,
                                 duration_s=args.sim_duration, time_scale=args.sim_time_scale,
                                 seed=args.seed)
            verdict = "VALID" if sim.meets else "NOT VALID (the simulated fleet misses the SLO)"
            print(f"check {pl.prefill}P:{pl.decode}D at {pl.rate:g} req/s: simulated"
                  f" p{slo.percentile:g} TTFT {_fmt(sim.ttft_ms, ' ms')} (predicted"
                  f" {_fmt(pl.pd.ttft_ms, ' ms')}, error {_err(pl.pd.ttft_ms, sim.ttft_ms)}),"
                  f" TPOT {_fmt(sim.tpot_ms, ' ms', 1)} (predicted {_fmt(pl.pd.tpot_ms, ' ms', 1)},"
                  f" error {_err(pl.pd.tpot_ms, sim.tpot_ms)}); {sim.requests} requests,"
                  f" {sim.failed + sim.unfinished} failed/unfinished, {sim.wall_s:.0f} s"
                  f" -> {verdict}")
            entry: dict[str, Any] = {"rate": pl.rate, "prefill": pl.prefill,
                                     "decode": pl.decode, "sim": sim.__dict__,
                                     "predicted": {"ttft_ms": pl.pd.ttft_ms,
                                                   "tpot_ms": pl.pd.tpot_ms}}
            if args.check_fewer and pl.binding_pool is not None:
                fp = pl.prefill - (pl.binding_pool == "prefill")
                fd = pl.decode - (pl.binding_pool == "decode")
                if fp >= 1 and fd >= 1:
                    pred = model.disaggregated(pl.rate, fp, fd)
                    fewer = await simulate(prof, wl, slo, pl.rate, prefill=fp, decode=fd,
                                           duration_s=args.sim_duration,
                                           time_scale=args.sim_time_scale, seed=args.seed)
                    print(f"  one fewer {pl.binding_pool} ({fp}P:{fd}D): simulated"
                          f" TTFT {_fmt(fewer.ttft_ms, ' ms')} (predicted"
                          f" {_fmt(pred.ttft_ms, ' ms')}), TPOT {_fmt(fewer.tpot_ms, ' ms', 1)}"
                          f" (predicted {_fmt(pred.tpot_ms, ' ms', 1)}) ->"
                          f" {'meets the SLO' if fewer.meets else 'misses the SLO'}")
                    entry["fewer"] = {"prefill": fp, "decode": fd, "sim": fewer.__dict__,
                                      "predicted": {"ttft_ms": pred.ttft_ms,
                                                    "tpot_ms": pred.tpot_ms}}
            if args.check_colocated and pl.colocated and pl.co is not None:
                co = await simulate(prof, wl, slo, pl.rate, colocated=pl.colocated,
                                    duration_s=args.sim_duration,
                                    time_scale=args.sim_time_scale, seed=args.seed)
                print(f"  colocated {pl.colocated}: simulated TTFT {_fmt(co.ttft_ms, ' ms')}"
                      f" (predicted {_fmt(pl.co.ttft_ms, ' ms')}), TPOT"
                      f" {_fmt(co.tpot_ms, ' ms', 1)} (predicted {_fmt(pl.co.tpot_ms, ' ms', 1)})"
                      f" -> {'meets the SLO' if co.meets else 'misses the SLO'}")
                entry["colocated"] = {"servers": pl.colocated, "sim": co.__dict__}
            checks.append(entry)
    else:
        print("\n(not simulated: the plan above is the model's alone, unverified)")
    if args.plot:
        from lb.planner.plot import plot

        out = plot(plans, args.plot, f"{wl.source}; {slo}")
        print(f"plot: {out}")
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(  # noqa: ASYNC240 - once, at the end
            {"slo": slo.__dict__, "workload": wl.describe(), "profile": prof.source,
             "plans": [_plan_dict(p) for p in plans], "checks": checks},
            option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return 0


def _plan_dict(p: Any) -> dict[str, Any]:
    def pred(x: Any) -> dict[str, Any] | None:
        return None if x is None else {"ttft_ms": _finite(x.ttft_ms), "tpot_ms": _finite(x.tpot_ms),
                                       "utilisation": {k: _finite(v) for k, v in
                                                       x.utilisation.items()}}

    return {"rate": p.rate, "prefill": p.prefill, "decode": p.decode,
            "colocated": p.colocated, "headroom": _finite_or_none(p.headroom),
            "binding": p.binding, "colocated_headroom": _finite_or_none(p.co_headroom),
            "pd": pred(p.pd), "co": pred(p.co)}


def _finite_or_none(v: float | None) -> float | None:
    return None if v is None else _finite(v)


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _headroom(h: float | None) -> str:
    from lb.planner.search import CAP

    if h is None:
        return "-"
    return f"> {CAP}x" if math.isinf(h) else f"{h:+.0%}"


def table(plans: Sequence[Any]) -> str:
    head = ("| rate req/s | PD P:D (total) | TTFT / TPOT predicted | headroom | binding"
            " | colocated | TTFT / TPOT predicted | headroom | disaggregate? |")
    lines = [head, "|" + "---|" * 9]
    for p in plans:
        pd = (f"{p.prefill}:{p.decode} ({p.total})" if p.total is not None else "none fits")
        pdp = (f"{_fmt(p.pd.ttft_ms)} / {_fmt(p.pd.tpot_ms, '', 1)} ms" if p.pd else "-")
        co = str(p.colocated) if p.colocated is not None else "none fits"
        cop = (f"{_fmt(p.co.ttft_ms)} / {_fmt(p.co.tpot_ms, '', 1)} ms" if p.co else "-")
        if p.total is None and p.colocated is None:
            verdict = "neither fits"
        elif p.colocated is None or (p.total is not None and p.total < p.colocated):
            verdict = "yes"
        elif p.total is None or p.total > p.colocated:
            verdict = "no: colocated needs fewer"
        else:
            verdict = "same count"
        hr, chr_ = _headroom(p.headroom), _headroom(p.co_headroom)
        lines.append(f"| {p.rate:g} | {pd} | {pdp} | {hr} | {p.binding or '-'} | {co} | {cop}"
                     f" | {chr_} | {verdict} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from lb.planner.profile import ProfileError
    from lb.planner.workload import WorkloadError

    args_list = list(sys.argv[1:] if argv is None else argv)
    is_profile = bool(args_list) and args_list[0] == "profile"
    parser = profile_parser() if is_profile else plan_parser()
    args = parser.parse_args(args_list[1:] if is_profile else args_list)
    try:
        return asyncio.run(_profile(args) if is_profile else _plan(args))
    except (ProfileError, WorkloadError, ValueError, RuntimeError) as exc:
        print(f"pdlb plan: {exc}", file=sys.stderr)
        return 2
