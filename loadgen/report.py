"""Human-readable output: the console table of one run and side-by-side comparisons."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import PurePath
from typing import Any
from urllib.parse import urlsplit

from loadgen.config import ENDPOINT_PATHS

LATENCY_ROWS: tuple[tuple[str, str], ...] = (
    ("TTFT", "ttft_ms"),
    ("TPOT", "tpot_ms"),
    ("ITL (per chunk)", "itl_ms"),
    ("ITL (per token)", "itl_per_token_ms"),
    ("E2E latency", "e2el_ms"),
    ("Schedule lag", "schedule_lag_ms"),
)
COLS = ("mean", "p50", "p90", "p95", "p99", "p99.9", "max")


def _f(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def describe_mode(config: Mapping[str, Any]) -> str:
    mode = config.get("resolved", {}).get("mode")
    bound = []
    if config.get("duration_s"):
        bound.append(f"{config['duration_s']:g} s")
    if config.get("num_requests"):
        bound.append(f"{config['num_requests']} requests")
    b = ", ".join(bound)
    if mode == "open":
        shape = config.get("arrival", "poisson")
        if config.get("burstiness", 1.0) != 1.0:
            shape = f"gamma (burstiness {config['burstiness']:g})"
        rate = f"{config['rate']:g} req/s"
        if config.get("ramp_to"):
            rate = f"ramp {config['rate']:g} → {config['ramp_to']:g} req/s"
        cap = (f", max {config['max_concurrency']} in flight"
               if config.get("max_concurrency") else "")
        return f"open loop, {shape}, {rate}{cap}; {b}"
    if mode == "closed":
        return f"closed loop, {config.get('concurrency')} users; {b}"
    return f"trace replay of {config.get('dataset')} (x{config.get('time_scale', 1.0):g})"


def _length(d: Mapping[str, Any] | None) -> str:
    if not d:
        return "?"
    if d.get("dist") == "uniform":
        return f"uniform {d.get('min')}–{d.get('max')}"
    text = f"{d.get('mean'):g}"
    if d.get("std"):
        text += f"±{d['std']:g}"
    if d.get("max") is not None:
        text += f" [{d.get('min')}–{d['max']}]"
    if d.get("dist") == "lognormal":
        text += " lognormal"
    return text


def _host(url: Any) -> str:
    parts = urlsplit(str(url or ""))
    host = parts.hostname or "?"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{host}:{parts.port}" if parts.port else host


def slo_text(slo: Mapping[str, float] | None, target: float | None = None) -> str:
    """``ttft ≤ 500 ms, tpot ≤ 50 ms; attainment target 90%`` (empty without an SLO)."""
    if not slo:
        return ""
    text = ", ".join(f"{k.removesuffix('_ms')} ≤ {v:g} ms" for k, v in slo.items())
    if target is not None:
        text += f"; attainment target {target * 100:g}%"
    return text


def settings_lines(config: Mapping[str, Any], meta: Mapping[str, Any] | None = None,
                   summary: Mapping[str, Any] | None = None, *,
                   sweep_rates: Sequence[float] | None = None) -> list[str]:
    """A run's settings in a few short lines (what a saved plot carries): target host and
    endpoint, load shape, workload and lengths, SLO, label, start date, versions.
    ``sweep_rates``: the rates a sweep stepped through (the load line then names them)."""
    meta = meta or {}
    res = config.get("resolved") or {}
    endpoint = res.get("endpoint") or config.get("endpoint") or "completions"
    model = meta.get("model") or config.get("model") or "(first at /v1/models)"
    workers = meta.get("workers") or config.get("workers") or 1
    lines = [f"target {_host(config.get('url'))} {ENDPOINT_PATHS.get(endpoint, endpoint)}"
             f" · model {model} · {config.get('http_client', 'fast')} client"
             f" · {workers} client process{'es' if workers != 1 else ''}"]
    if sweep_rates is not None:
        bound = []
        if config.get("duration_s"):
            bound.append(f"{config['duration_s']:g} s")
        if config.get("num_requests"):
            bound.append(f"{config['num_requests']} requests")
        shape = config.get("arrival", "poisson")
        if config.get("burstiness", 1.0) != 1.0:
            shape = f"gamma (burstiness {config['burstiness']:g})"
        cap = (f", max {config['max_concurrency']} in flight"
               if config.get("max_concurrency") else "")
        rates = ", ".join(f"{r:g}" for r in sorted(sweep_rates))
        load = f"sweep, open loop, {shape}{cap}, rates {rates} req/s; {', '.join(bound)} per step"
    else:
        load = describe_mode(config)
    extras = []
    if config.get("think_time_s"):
        extras.append(f"think time {config['think_time_s']:g} s")
    if config.get("warmup"):
        extras.append(f"{config['warmup']} warm-up requests")
    lines.append("load " + load + (f" · {', '.join(extras)}" if extras else ""))
    work = [f"mix {config['mix']}" if config.get("mix") else "random prompts"]
    if config.get("dataset"):
        work = [f"dataset {PurePath(str(config['dataset'])).name}"]
    else:
        work.append(f"input {_length(res.get('input_len') or config.get('input_len'))} tok")
    work.append(f"output {_length(res.get('output_len') or config.get('output_len'))} tok")
    if config.get("prefix_groups"):
        work.append(f"{config['prefix_groups']} shared prefixes of {config.get('prefix_len')} "
                    f"tok × {config.get('questions_per_group')} questions")
    turns = res.get("turns") or config.get("turns") or 1
    if turns > 1:
        work.append(f"{turns} turns")
    work.append(f"seed {config.get('seed', 0)}")
    lines.append("workload " + ", ".join(work))
    slo = (summary or {}).get("slo") or config.get("slo")
    target = (summary or {}).get("slo_target", config.get("slo_target"))
    if slo:
        lines.append("SLO " + slo_text(slo, target))
    when = meta.get("started_at")
    if when:
        with contextlib.suppress(ValueError):
            when = datetime.fromisoformat(str(when)).strftime("%Y-%m-%d %H:%M %Z").strip()
    run = [f"label {config['label']}" if config.get("label") else None,
           f"started {when}" if when else None,
           f"loadgen {meta['loadgen_version']}" if meta.get("loadgen_version") else None,
           f"pdlb {meta['pdlb_version']}" if meta.get("pdlb_version") else None]
    if any(run):
        lines.append(" · ".join(x for x in run if x))
    return lines


def table(summary: Mapping[str, Any], config: Mapping[str, Any] | None = None,
          meta: Mapping[str, Any] | None = None,
          stages: Mapping[str, Any] | None = None) -> str:
    """The console report of one run."""
    s = summary
    lines: list[str] = []
    title = " pdlb loadgen " + (f"— {config.get('label')} " if config and config.get("label")
                                else "")
    lines.append(title.center(78, "="))
    if config:
        res = config.get("resolved", {})
        model = (meta or {}).get("model") or config.get("model")
        lines.append(f"Target         {config.get('url')}  ({res.get('endpoint')}, "
                     f"model {model})")
        lines.append(f"Load           {describe_mode(config)}")
        if meta and meta.get("workers", 1) > 1:
            lines.append(f"Workers        {meta['workers']} processes")
    lines.append(f"Requests       {s['requests']} total: {s['completed']} completed, "
                 f"{s['failed']} failed, {s['not_sent']} not sent")
    rates = f"offered {_f(s.get('offered_rate'))}"
    if s.get("scheduled_rate") is not None and s.get("scheduled_rate") != s.get("offered_rate"):
        rates += f", schedule drawn {_f(s.get('scheduled_rate'))}"
    lines.append(f"Duration       {_f(s['duration_s'], 2)} s   send rate "
                 f"{_f(s.get('send_rate'))} req/s ({rates})   "
                 f"peak in flight {s.get('peak_in_flight')}")
    lines.append(f"Throughput     {_f(s['request_throughput'], 2)} req/s   "
                 f"{_f(s['output_throughput'])} output tok/s   "
                 f"{_f(s['total_token_throughput'])} total tok/s")
    if meta and meta.get("client_wall_s"):
        workers = meta.get("workers", 1) or 1
        share = meta["client_cpu_s"] / meta["client_wall_s"] / workers
        busy = "  ← near its ceiling: add --workers" if share > 0.85 else ""
        lines.append(f"Client         {share * 100:.0f}% of a core per process while running, "
                     f"preempted {meta.get('client_preempted', 0):,} times{busy}")
    lines.append(f"Tokens         {s['total_input_tokens']:,} in, "
                 f"{s['total_output_tokens']:,} out (counts from {s['token_counts_from']})")
    lines.append("")
    lines.append(f"{'latency (ms)':<17}" + "".join(f"{c:>9}" for c in COLS) + f"{'n':>9}")
    rows = list(LATENCY_ROWS)
    qw = s.get("queue_wait_ms") or {}
    if (qw.get("max") or 0) > 0:
        rows.append(("Slot wait", "queue_wait_ms"))
        rows.append(("TTFT from sched.", "ttft_from_scheduled_ms"))
    for name, key in rows:
        st = s.get(key) or {}
        lines.append(f"{name:<17}" + "".join(f"{_f(st.get(c), 2):>9}" for c in COLS)
                     + f"{st.get('count', 0):>9}")
    if s.get("itl_per_token_unavailable"):
        lines.append(f"  (per-token ITL unknown for {s['itl_per_token_unavailable']} request(s):"
                     " the server sent no per-chunk usage)")
    if stages and stages.get("stages"):
        lines.append("")
        lines.append("pdlb stages (from /metrics)    count   mean ms    p50 ms    p90 ms    p99 ms")
        for name, st in stages["stages"].items():
            lines.append(f"  {name:<27}{st['count']:>8}" + "".join(
                f"{_f(st.get(k), 2):>10}" for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms")))
    if "slo" in s:
        slo = ",".join(f"{k[:-3]}:{v:g}" for k, v in s["slo"].items())
        verdict = "MET" if s["slo_met"] else "MISSED"
        lines.append("")
        lines.append(f"SLO {slo}: attainment {s['slo_attainment'] * 100:.2f}% "
                     f"({s['good']}/{s['requests']}, failures count as misses) vs target "
                     f"{s['slo_target'] * 100:g}% → {verdict};  goodput "
                     f"{_f(s['goodput'], 2)} req/s")
    if s.get("errors"):
        lines.append("")
        lines.append("Errors (most common):")
        for err, n in s["errors"].items():
            lines.append(f"  {n:>7} × {err}")
    if s.get("lag_warning"):
        lines.append("")
        lines.append("!" * 78)
        lines.append("!! " + s["lag_warning"])
        lines.append("!" * 78)
    if meta and meta.get("interrupted"):
        lines.append("!! run interrupted: the numbers cover only what was sent")
    lines.append(f"(metrics: {s.get('metric_definitions')})")
    return "\n".join(lines)


COMPARE_ROWS: tuple[tuple[str, str, str | None, int], ...] = (
    ("completed", "completed", None, 0),
    ("failed", "failed", None, 0),
    ("duration s", "duration_s", None, 2),
    ("req/s", "request_throughput", None, 2),
    ("output tok/s", "output_throughput", None, 1),
    ("TTFT mean ms", "ttft_ms", "mean", 1),
    ("TTFT p50 ms", "ttft_ms", "p50", 1),
    ("TTFT p99 ms", "ttft_ms", "p99", 1),
    ("TPOT p50 ms", "tpot_ms", "p50", 2),
    ("TPOT p99 ms", "tpot_ms", "p99", 2),
    ("ITL p50 ms", "itl_ms", "p50", 2),
    ("ITL p99 ms", "itl_ms", "p99", 2),
    ("E2EL p50 ms", "e2el_ms", "p50", 1),
    ("E2EL p99 ms", "e2el_ms", "p99", 1),
    ("sched. lag p99 ms", "schedule_lag_ms", "p99", 2),
    ("goodput req/s", "goodput", None, 2),
    ("SLO attainment %", "slo_attainment", None, 2),
)


def _get(summary: Mapping[str, Any], key: str, sub: str | None) -> Any:
    v = summary.get(key)
    if sub is not None:
        v = v.get(sub) if isinstance(v, Mapping) else None
    if key == "slo_attainment" and v is not None:
        v = v * 100.0
    return v


def side_by_side(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """Summaries in columns, one row per key metric; with two runs, a change column."""
    if not runs:
        raise ValueError("nothing to compare")
    labels = [label for label, _ in runs]
    width = max(12, *(len(lab) + 2 for lab in labels))
    two = len(runs) == 2
    head = f"{'metric':<20}" + "".join(f"{lab:>{width}}" for lab in labels)
    if two:
        head += f"{'change':>10}"
    lines = [head, "-" * len(head)]
    for name, key, sub, nd in COMPARE_ROWS:
        vals = [_get(s, key, sub) for _, s in runs]
        if all(v is None for v in vals):
            continue
        row = f"{name:<20}" + "".join(f"{_f(v, nd):>{width}}" for v in vals)
        if two:
            a, b = vals
            if isinstance(a, int | float) and isinstance(b, int | float) and a:
                row += f"{(b - a) / abs(a) * 100:>+9.1f}%"
            else:
                row += f"{'':>10}"
        lines.append(row)
    behind = [lab for lab, s in runs if s.get("fell_behind")]
    if behind:
        lines.append(f"!! the client fell behind its schedule in: {', '.join(behind)}")
    slo_sets = {str(s.get("slo")) for _, s in runs if "slo" in s}
    if len(slo_sets) > 1:
        lines.append("!! the runs used different SLOs; goodput is not comparable")
    return "\n".join(lines)
