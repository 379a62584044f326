"""``pdlb loadgen`` (also ``python -m loadgen``).

    pdlb loadgen [run] --url URL (--rate R | --concurrency N) (--duration S | --num-requests N)
    pdlb loadgen sweep --url URL --slo ttft:500,tpot:50 --duration 30 [--rates 5,10,20]
    pdlb loadgen report RESULT.json [--slo ...] [--plot]
    pdlb loadgen compare A.json B.json [...]

Exit status: 0 done (SLO met, if one was given); 1 the SLO was missed (or a sweep found no
passing rate); 2 bad arguments, unreachable server or failed preflight; 3 with
``--strict-lag``, the client fell behind its schedule.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

from loadgen.api import RunResult, render_side_by_side, run
from loadgen.client import LoadgenError
from loadgen.config import LoadConfig
from loadgen.metrics import SLO
from loadgen.tokenizer import DEFAULT_TOKENIZER
from loadgen.workload import MIXES, LengthDist

EXIT_OK, EXIT_SLO_MISSED, EXIT_USAGE, EXIT_BEHIND = 0, 1, 2, 3
SUBCOMMANDS = ("run", "sweep", "report", "compare")
T = TypeVar("T")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"header {text!r}: expected NAME:VALUE")
    return name.strip(), value.strip()


def _json_obj(text: str) -> dict[str, Any]:
    try:
        v = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return v


def base_url(text: str) -> str:
    """``--url``: the server's root. The OpenAI SDK's base URL form (``.../v1``) is accepted:
    loadgen appends ``/v1/completions`` itself, so a trailing ``/v1`` is dropped, with a note
    on stderr."""
    url = text.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
        print(f"note: --url {text}: using {url} (loadgen adds /v1/... itself)", file=sys.stderr)
    return url


def add_load_args(p: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    t = p.add_argument_group("target")
    t.add_argument("--url", required=True, type=base_url,
                   help="server base URL, e.g. http://127.0.0.1:8000 (the OpenAI SDK's"
                        " http://127.0.0.1:8000/v1 works too: the /v1 is dropped)")
    t.add_argument("--model", help="model name (default: the first one at /v1/models)")
    t.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    t.add_argument("--api-key", help="bearer token (default: $OPENAI_API_KEY)")
    t.add_argument("--header", type=_header, action="append", default=[],
                   metavar="NAME:VALUE", help="extra request header (repeatable)")
    t.add_argument("--extra-body", type=_json_obj, default={}, metavar="JSON",
                   help="fields merged into every request body")
    t.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (vLLM extension); outputs may then be shorter")
    t.add_argument("--no-continuous-usage", dest="continuous_usage", action="store_false",
                   help="do not ask for per-chunk usage (continuous_usage_stats)")
    t.add_argument("--timeout", type=_positive_float, default=600.0, metavar="S",
                   help="per-request timeout (default 600 s)")
    t.add_argument("--http-client", choices=("fast", "aiohttp"), default="fast",
                   help="fast (default): lean keep-alive HTTP/1.1 client, measured at "
                        "370-500 µs CPU per coalesced 64-token stream vs aiohttp's ~615 µs, "
                        "no gain at one read per token (2-core VM, docs/loadgen.md); "
                        "aiohttp: aiohttp's full client")

    a = p.add_argument_group("arrivals")
    if not sweep:
        a.add_argument("--rate", type=_positive_float, metavar="R",
                       help="open loop: requests (or sessions) per second")
        a.add_argument("--concurrency", type=int, metavar="N",
                       help="closed loop: N users, each sending when its last request ends")
    a.add_argument("--arrival", choices=("poisson", "gamma", "constant"), default="poisson")
    a.add_argument("--burstiness", type=_positive_float, default=1.0,
                   help="gamma shape: 1 = Poisson, <1 burstier, >1 smoother (default 1)")
    if not sweep:
        a.add_argument("--ramp-to", type=_positive_float, metavar="R",
                       help="ramp the rate linearly from --rate to R over the run")
    a.add_argument("--max-concurrency", type=int, metavar="N",
                   help="cap in-flight requests of an open loop (waits are reported)")
    a.add_argument("--think-time", type=float, default=0.0, metavar="S",
                   help="pause between a user's/session's requests")
    a.add_argument("--duration", type=_positive_float, metavar="S",
                   help="send for S seconds (then wait for in-flight requests)")
    a.add_argument("--num-requests", "-n", type=int, metavar="N")
    a.add_argument("--time-scale", type=_positive_float, default=1.0,
                   help="trace replay speed-up (2 = twice as fast)")

    w = p.add_argument_group("workload")
    w.add_argument("--mix", choices=sorted(MIXES), help="; ".join(
        f"{m.name}: {m.description}" for m in MIXES.values()))
    for side in ("input", "output"):
        w.add_argument(f"--{side}-len", type=int, metavar="TOKENS", help=f"mean {side} length")
        w.add_argument(f"--{side}-std", type=float, default=None, metavar="TOKENS")
        w.add_argument(f"--{side}-min", type=int, default=None, metavar="TOKENS")
        w.add_argument(f"--{side}-max", type=int, default=None, metavar="TOKENS")
    w.add_argument("--len-dist", choices=("normal", "lognormal", "uniform"), default="normal",
                   help="shape of the length distributions (normal is truncated to min/max)")
    w.add_argument("--dataset", metavar="PATH",
                   help="JSONL (prompt|messages, max_tokens, timestamp) or ShareGPT JSON")
    w.add_argument("--dataset-format", choices=("auto", "jsonl", "sharegpt"), default="auto")
    w.add_argument("--turns", type=int, help="turns per multi-turn session")
    w.add_argument("--prefix-groups", type=int, default=0, metavar="N",
                   help="N shared system prompts ...")
    w.add_argument("--questions-per-group", type=int, default=1, metavar="M",
                   help="... each shared by M questions")
    w.add_argument("--prefix-len", type=int, default=0, metavar="TOKENS",
                   help="length of each shared system prompt")
    w.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help="tiktoken encoding name or path to a HuggingFace tokenizer.json")
    w.add_argument("--seed", type=int, default=0)

    r = p.add_argument_group("run and output")
    r.add_argument("--slo", nargs="+", metavar="NAME:MS",
                   help="per-request SLO, e.g. ttft:500,tpot:50,e2el:5000")
    r.add_argument("--slo-target", type=float, default=0.9,
                   help="attainment needed to pass (fraction, default 0.9)")
    r.add_argument("--max-lag-ms", type=float, default=5.0,
                   help="p99 schedule lag above which the run warns (default 5 ms)")
    r.add_argument("--strict-lag", action="store_true",
                   help="exit 3 when the client fell behind its schedule")
    r.add_argument("--workers", type=int, default=1, help="client processes (default 1)")
    r.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="unrecorded requests before time zero")
    r.add_argument("--no-preflight", dest="preflight", action="store_false")
    r.add_argument("--scrape-metrics", action="store_true",
                   help="add pdlb's per-stage breakdown from its /metrics")
    r.add_argument("--metrics-url", help="where /metrics is (default URL/metrics)")
    r.add_argument("--label", help="name of this run in tables and comparisons")
    r.add_argument("--out", metavar="PATH", help="result JSON (records go to *.records.jsonl)")
    r.add_argument("--plot", action="store_true", help="write PNG plots beside --out")
    r.add_argument("--no-progress", dest="progress", action="store_false")
    r.add_argument("--quiet", "-q", action="store_true", help="no table on stdout")


def _length(args: argparse.Namespace, side: str) -> LengthDist | None:
    mean = getattr(args, f"{side}_len")
    std, lo, hi = (getattr(args, f"{side}_{k}") for k in ("std", "min", "max"))
    if mean is None and std is None and lo is None and hi is None:
        return None
    mix = MIXES.get(args.mix or "")
    base = (mix.input_len if side == "input" else mix.output_len) if mix else None
    if mean is None:
        mean = base.mean if base else (256 if side == "input" else 64)
    return LengthDist(
        mean=mean,
        std=std if std is not None else (base.std if base and mean == base.mean else 0.0),
        min=lo if lo is not None else 1,
        max=hi,
        dist=args.len_dist,
    )


def config_from_args(args: argparse.Namespace, **override: Any) -> LoadConfig:
    kwargs: dict[str, Any] = dict(
        url=args.url, model=args.model, endpoint=args.endpoint,
        rate=getattr(args, "rate", None), arrival=args.arrival, burstiness=args.burstiness,
        ramp_to=getattr(args, "ramp_to", None), concurrency=getattr(args, "concurrency", None),
        max_concurrency=args.max_concurrency, think_time_s=args.think_time,
        duration_s=args.duration, num_requests=args.num_requests, time_scale=args.time_scale,
        mix=args.mix, input_len=_length(args, "input"), output_len=_length(args, "output"),
        dataset=args.dataset, dataset_format=args.dataset_format, turns=args.turns,
        prefix_groups=args.prefix_groups, prefix_len=args.prefix_len,
        questions_per_group=args.questions_per_group, tokenizer=args.tokenizer,
        seed=args.seed, ignore_eos=args.ignore_eos, continuous_usage=args.continuous_usage,
        extra_body=args.extra_body, headers=dict(args.header), api_key=args.api_key,
        timeout_s=args.timeout, http_client=args.http_client, warmup=args.warmup,
        preflight=args.preflight,
        workers=args.workers, slo=SLO.parse(args.slo) if args.slo else None,
        slo_target=args.slo_target, max_lag_ms=args.max_lag_ms,
        scrape_metrics=args.scrape_metrics, metrics_url=args.metrics_url, label=args.label,
    )
    kwargs.update(override)
    return LoadConfig(**kwargs)


def _event_loop_runner() -> asyncio.Runner:
    try:
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        return asyncio.Runner()


def _run_async(make: Callable[[asyncio.Event], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on uvloop; the first Ctrl-C asks it to stop, the second aborts."""
    with _event_loop_runner() as runner:
        loop = runner.get_loop()
        stopping = asyncio.Event()

        def on_sigint() -> None:
            if stopping.is_set():
                loop.remove_signal_handler(signal.SIGINT)
                raise KeyboardInterrupt
            print("\nstopping: finishing in-flight requests (Ctrl-C again to abort)",
                  file=sys.stderr)
            stopping.set()

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not main thread
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        return runner.run(make(stopping))


def _write_outputs(result: RunResult, out: str | None, plot: bool) -> None:
    if out:
        jpath, rpath = result.write(out)
        print(f"wrote {jpath} and {rpath}", file=sys.stderr)
    if plot:
        _plot_cdfs([result], Path(out or "loadgen").with_suffix(".cdf.png"))


def _plot_cdfs(results: Sequence[RunResult], path: Path) -> None:
    from loadgen.plots import PlotUnavailable, plot_cdfs
    from loadgen.report import settings_lines

    settings: list[str] = []
    for r in results:
        lines = settings_lines(r.config, r.meta, r.summary)
        settings += lines if len(results) == 1 else [f"{r.label}: {lines[0]}", *(
            "    " + line for line in lines[1:])]
    try:
        plot_cdfs([(r.label, r.records) for r in results], path,
                  run_slos=[r.summary.get("slo") for r in results], settings=settings)
        print(f"wrote {path}", file=sys.stderr)
    except PlotUnavailable as exc:
        print(f"warning: {exc}", file=sys.stderr)


def _exit_for(summary: dict[str, Any], strict_lag: bool) -> int:
    if "slo" in summary and not summary["slo_met"]:
        return EXIT_SLO_MISSED
    if strict_lag and summary.get("fell_behind"):
        return EXIT_BEHIND
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = _run_async(lambda stop: run(config, progress=args.progress, stopping=stop))
    if not args.quiet:
        print(result.table())
    elif result.summary.get("lag_warning"):
        print(result.summary["lag_warning"], file=sys.stderr)
    _write_outputs(result, args.out, args.plot)
    return _exit_for(result.summary, args.strict_lag)


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected rates like 5,10,20") from None
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: rates must be > 0")
    return rates


def cmd_sweep(args: argparse.Namespace) -> int:
    from loadgen.sweep import SweepStep, sweep

    if not args.slo:
        raise ValueError("sweep needs --slo")
    config = config_from_args(args, rate=args.start)

    def on_step(st: SweepStep) -> None:
        s = st.result.summary
        print(f"rate {st.rate:g}: attainment {s['slo_attainment'] * 100:.2f}%  "
              f"goodput {s['goodput']:.2f} req/s  "
              f"{'pass' if st.passed else 'miss'}", file=sys.stderr)

    res = _run_async(lambda stop: sweep(
        config, rates=args.rates, start=args.start, max_rate=args.max_rate,
        bisect_steps=args.bisect_steps, progress=args.progress, on_step=on_step))
    print(res.table())
    if args.out:
        path = res.write(args.out)
        print(f"wrote {path} (and one result file per step)", file=sys.stderr)
        if args.plot:
            from loadgen.plots import PlotUnavailable, plot_sweep
            from loadgen.report import settings_lines

            try:
                meta = res.steps[0].result.meta if res.steps else {}
                settings = settings_lines(res.config, meta,
                                          sweep_rates=[s.rate for s in res.steps])
                png = plot_sweep([s.row() for s in res.steps], path.with_suffix(".png"),
                                 config.slo.to_dict() if config.slo else None,
                                 config.slo_target, settings)
                print(f"wrote {png}", file=sys.stderr)
            except PlotUnavailable as exc:
                print(f"warning: {exc}", file=sys.stderr)
    return EXIT_OK if res.max_rate is not None else EXIT_SLO_MISSED


def cmd_report(args: argparse.Namespace) -> int:
    from loadgen.sweep import SWEEP_SCHEMA, sweep_table

    head = Path(args.result).read_bytes()[:200] if Path(args.result).is_file() else b""
    if SWEEP_SCHEMA.encode() in head:
        data = orjson.loads(Path(args.result).read_bytes())
        print(sweep_table(data))
        return EXIT_OK if data.get("max_rate_meeting_slo") is not None else EXIT_SLO_MISSED
    result = RunResult.load(args.result)
    slo = SLO.parse(args.slo) if args.slo else None
    if result.records and (slo is not None or args.recompute or args.slo_target is not None):
        result = result.recompute(slo=slo, slo_target=args.slo_target)
    elif slo is not None:
        raise ValueError(f"{args.result}: records file missing; cannot apply a new SLO")
    if args.json:
        print(orjson.dumps(result.summary, option=orjson.OPT_INDENT_2).decode())
    else:
        print(result.table())
    if args.plot:
        if not result.records:
            print(f"warning: no records beside {args.result}; no plot", file=sys.stderr)
        else:
            _plot_cdfs([result], Path(args.result).with_suffix(".cdf.png"))
    return _exit_for(result.summary, False)


def cmd_compare(args: argparse.Namespace) -> int:
    results = [RunResult.load(p, with_records=args.plot) for p in args.results]
    labels = [r.label for r in results]
    if len(set(labels)) < len(labels):  # make columns distinguishable
        for r, p in zip(results, args.results, strict=True):
            r.config = {**r.config, "label": Path(p).stem}
    print(render_side_by_side(results))
    if args.plot:
        _plot_cdfs(results, Path(args.plot))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdlb loadgen",
        description="Load generator for SLO testing of OpenAI-compatible endpoints "
                    "(vLLM bench serve metric definitions).",
        epilog="Exit status: 0 ok, 1 SLO missed, 2 usage/connection error, "
               "3 client fell behind (with --strict-lag).")
    sub = parser.add_subparsers(dest="command", metavar="{run,sweep,report,compare}")
    p_run = sub.add_parser("run", help="one run (the default subcommand)")
    add_load_args(p_run)
    p_run.set_defaults(func=cmd_run)

    p_sw = sub.add_parser("sweep", help="find the highest rate meeting the SLO")
    add_load_args(p_sw, sweep=True)
    p_sw.add_argument("--rates", type=_rates, help="explicit rates, e.g. 5,10,20,40")
    p_sw.add_argument("--start", type=_positive_float, default=1.0,
                      help="search: first rate (doubles until a miss)")
    p_sw.add_argument("--max-rate", type=_positive_float, default=1000.0)
    p_sw.add_argument("--bisect-steps", type=int, default=4)
    p_sw.set_defaults(func=cmd_sweep)

    p_rep = sub.add_parser("report", help="print (and recompute) a saved result")
    p_rep.add_argument("result")
    p_rep.add_argument("--slo", nargs="+", help="recompute goodput with this SLO")
    p_rep.add_argument("--slo-target", type=float)
    p_rep.add_argument("--recompute", action="store_true",
                       help="recompute the summary from the records file")
    p_rep.add_argument("--json", action="store_true", help="print the summary as JSON")
    p_rep.add_argument("--plot", action="store_true", help="write latency CDFs (PNG)")
    p_rep.set_defaults(func=cmd_report)

    p_cmp = sub.add_parser("compare", help="two or more results side by side")
    p_cmp.add_argument("results", nargs="+")
    p_cmp.add_argument("--plot", metavar="PNG", help="overlay the runs' latency CDFs")
    p_cmp.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "run")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        rc: int = args.func(args)
        return rc
    except (ValueError, LoadgenError, OSError) as exc:
        print(f"pdlb loadgen: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("pdlb loadgen: aborted", file=sys.stderr)
        return 130

