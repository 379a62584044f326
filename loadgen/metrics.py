"""Metrics: pure functions from records to numbers, with vLLM ``bench serve``'s definitions.

- TTFT: send → first chunk that carries generated output (a role-only or empty chunk does not
  count; vLLM's own client counts any chunk with ``choices``).
- ITL: every gap between consecutive output-bearing chunks, pooled over requests. When a chunk
  carries several tokens, ``itl_per_token_ms`` also reports gap / tokens-in-the-later-chunk.
- TPOT: per request, (E2EL - TTFT) / (output_tokens - 1); one-token requests are left out of
  TPOT statistics (and count as TPOT 0 for goodput, as in vLLM).
- E2EL: send → last output-bearing chunk.
- Throughput: completed requests, output tokens, input + output tokens, each / duration.
  Token counts come from the server's ``usage``.
- Goodput (vLLM): requests per second that met every SLO. SLO attainment (DistServe): good
  requests / ALL requests, failed ones counting as misses.
- Percentiles interpolate linearly between order statistics (numpy's default, as vLLM).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from loadgen.records import Record

PERCENTILES: tuple[float, ...] = (50.0, 90.0, 95.0, 99.0, 99.9)


@dataclass(frozen=True, slots=True)
class SLO:
    """Per-request latency limits in milliseconds; ``None`` means not constrained."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, spec: str | Sequence[str]) -> SLO:
        """Parse ``"ttft:500,tpot:50"`` or ``["ttft:500", "tpot:50"]``."""
        parts = [spec] if isinstance(spec, str) else list(spec)
        items = [p.strip() for part in parts for p in part.replace(" ", ",").split(",")]
        values: dict[str, float] = {}
        for item in filter(None, items):
            name, sep, raw = item.partition(":")
            name = name.strip().lower()
            if not sep or name not in ("ttft", "tpot", "e2el"):
                raise ValueError(
                    f"bad SLO item {item!r}: expected ttft:MS, tpot:MS or e2el:MS"
                )
            try:
                ms = float(raw)
            except ValueError:
                raise ValueError(f"bad SLO value in {item!r}: {raw!r} is not a number") from None
            if not ms > 0:
                raise ValueError(f"bad SLO value in {item!r}: must be > 0 ms")
            values[f"{name}_ms"] = ms
        if not values:
            raise ValueError("empty SLO: give at least one of ttft:MS, tpot:MS, e2el:MS")
        return cls(**values)

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("ttft_ms", self.ttft_ms), ("tpot_ms", self.tpot_ms),
                                  ("e2el_ms", self.e2el_ms)) if v is not None}

    def __str__(self) -> str:
        return ",".join(f"{k[:-3]}:{v:g}" for k, v in self.to_dict().items())


# --- order statistics ------------------------------------------------------------------------

def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile of already sorted values (numpy's default method)."""
    n = len(sorted_values)
    if n == 0:
        raise ValueError("percentile of no values")
    k = (n - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def pkey(p: float) -> str:
    """50.0 → 'p50', 99.9 → 'p99.9'."""
    return f"p{p:g}"


def stats(values: Iterable[float], scale: float = 1000.0) -> dict[str, Any]:
    """count, mean, std, min, percentiles and max; values are multiplied by ``scale``.

    With no values every statistic is ``None`` (never a misleading 0).
    """
    vals = sorted(v * scale for v in values)
    n = len(vals)
    out: dict[str, Any] = {"count": n}
    if n == 0:
        out.update({"mean": None, "std": None, "min": None})
        out.update({pkey(p): None for p in PERCENTILES})
        out["max"] = None
        return out
    mean = math.fsum(vals) / n
    out["mean"] = mean
    out["std"] = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / n)
    out["min"] = vals[0]
    for p in PERCENTILES:
        out[pkey(p)] = percentile(vals, p)
    out["max"] = vals[-1]
    return out


# --- per-request quantities ------------------------------------------------------------------

def output_tokens(rec: Record) -> int:
    """Output tokens from the server's usage; the output-chunk count when it sent none."""
    if rec.output_tokens is not None:
        return rec.output_tokens
    return len(rec.chunk_times)


def tpot(rec: Record) -> float | None:
    """(E2EL - TTFT) / (output_tokens - 1); None for failed or one-token requests."""
    if not rec.ok or not rec.chunk_times:
        return None
    n = output_tokens(rec)
    if n <= 1:
        return None
    return (rec.chunk_times[-1] - rec.chunk_times[0]) / (n - 1)


def itls(rec: Record) -> list[float]:
    """Gaps between consecutive output-bearing chunks of one successful request."""
    if not rec.ok:
        return []
    t = rec.chunk_times
    return [t[i] - t[i - 1] for i in range(1, len(t))]


def chunk_token_counts(rec: Record) -> Sequence[int] | None:
    """Tokens per output chunk: reported per chunk, or 1 each when chunks == usage tokens."""
    if rec.chunk_tokens is not None and len(rec.chunk_tokens) == len(rec.chunk_times):
        return rec.chunk_tokens
    if rec.output_tokens is not None and rec.output_tokens == len(rec.chunk_times):
        return [1] * len(rec.chunk_times)
    return None


def itls_per_token(rec: Record) -> list[float] | None:
    """Token-normalised ITL: each gap / tokens in the later chunk; None when unknown."""
    if not rec.ok:
        return []
    counts = chunk_token_counts(rec)
    if counts is None:
        return None
    t = rec.chunk_times
    return [(t[i] - t[i - 1]) / counts[i] for i in range(1, len(t)) if counts[i] > 0]


def meets_slo(rec: Record, slo: SLO) -> bool:
    """vLLM's rule: every given limit met; a failed request never meets it."""
    if not rec.ok or not rec.chunk_times:
        return False
    if slo.ttft_ms is not None and rec.chunk_times[0] * 1000.0 > slo.ttft_ms:
        return False
    if slo.e2el_ms is not None and rec.chunk_times[-1] * 1000.0 > slo.e2el_ms:
        return False
    if slo.tpot_ms is not None:
        value = tpot(rec)
        if (value or 0.0) * 1000.0 > slo.tpot_ms:
            return False
    return True


def run_window(records: Sequence[Record]) -> tuple[float, float]:
    """(start, end) of a run: first scheduled/sent time → last response end."""
    starts = [min(r.scheduled, r.sent) if r.sent is not None else r.scheduled for r in records]
    ends = [r.sent + (r.finished or 0.0) for r in records if r.sent is not None]
    if not starts:
        return 0.0, 0.0
    start = min(starts)
    return start, max(ends, default=start)


def peak_in_flight(records: Sequence[Record]) -> int:
    events: list[tuple[float, int]] = []
    for r in records:
        if r.sent is not None and r.finished is not None:
            events.append((r.sent, 1))
            events.append((r.sent + r.finished, -1))
    events.sort()
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def error_counts(records: Iterable[Record], top: int = 10) -> dict[str, int]:
    counter = Counter((r.error or "unknown error")[:120] for r in records if not r.ok)
    return dict(counter.most_common(top))


# --- the summary -----------------------------------------------------------------------------

def asked_rate(rate: float | None, ramp_to: float | None) -> float | None:
    """The open-loop rate a run asked for: ``--rate``, or a linear ramp's mean."""
    if rate is None:
        return None
    return (rate + ramp_to) / 2.0 if ramp_to is not None else float(rate)


def summarize(
    records: Sequence[Record],
    *,
    slo: SLO | None = None,
    slo_target: float = 0.9,
    max_lag_ms: float = 5.0,
    duration_s: float | None = None,
    asked_rate: float | None = None,
) -> dict[str, Any]:
    """The run's summary (see docs/loadgen.md for the schema), from records alone.

    ``asked_rate``: the open-loop rate asked for (``--rate``; a ramp's mean), reported as
    ``offered_rate``; ``scheduled_rate`` is the rate of the schedule actually drawn (a Poisson
    sample of few requests can be far from the asked rate) and ``send_rate`` the rate the
    requests went out at. Without it (closed loop, trace replay) ``offered_rate`` is the
    schedule's."""
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok and r.sent is not None]
    not_sent = [r for r in records if r.sent is None]
    start, end = run_window(records)
    duration = duration_s if duration_s is not None else end - start
    per_s = (1.0 / duration) if duration > 0 else 0.0

    out_tokens = sum(output_tokens(r) for r in ok)
    in_tokens = sum(
        (r.prompt_tokens if r.prompt_tokens is not None else (r.expected_input_len or 0))
        for r in ok
    )
    usage_missing = sum(1 for r in ok if r.output_tokens is None)

    itl_all: list[float] = []
    itl_tok: list[float] = []
    itl_tok_missing = 0
    for r in ok:
        itl_all.extend(itls(r))
        norm = itls_per_token(r)
        if norm is None:
            itl_tok_missing += 1
        else:
            itl_tok.extend(norm)

    sent = [r for r in records if r.sent is not None]
    lags = [lag for r in sent if (lag := r.schedule_lag) is not None]
    lag_stats = stats(lags)
    sent_times = sorted(r.sent for r in sent if r.sent is not None)
    sched_times = sorted(r.scheduled for r in records)
    send_span = sent_times[-1] - sent_times[0] if len(sent_times) > 1 else 0.0
    sched_span = sched_times[-1] - sched_times[0] if len(sched_times) > 1 else 0.0

    scheduled_rate = (len(sched_times) - 1) / sched_span if sched_span > 0 else None
    summary: dict[str, Any] = {
        "metric_definitions": "vllm-bench-serve (TTFT from first output-bearing chunk)",
        "requests": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "not_sent": len(not_sent),
        "duration_s": duration,
        "request_throughput": len(ok) * per_s,
        "output_throughput": out_tokens * per_s,
        "total_token_throughput": (in_tokens + out_tokens) * per_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "token_counts_from": "usage" if usage_missing == 0 else (
            f"chunk count for {usage_missing} request(s) without usage"),
        "offered_rate": asked_rate if asked_rate is not None else scheduled_rate,
        "scheduled_rate": scheduled_rate,
        "send_rate": (len(sent_times) - 1) / send_span if send_span > 0 else None,
        "peak_in_flight": peak_in_flight(records),
        "ttft_ms": stats(r.chunk_times[0] for r in ok if r.chunk_times),
        "tpot_ms": stats(v for r in ok if (v := tpot(r)) is not None),
        "itl_ms": stats(itl_all),
        "itl_per_token_ms": stats(itl_tok),
        "itl_per_token_unavailable": itl_tok_missing,
        "e2el_ms": stats(r.chunk_times[-1] for r in ok if r.chunk_times),
        "schedule_lag_ms": lag_stats,
        "queue_wait_ms": stats(r.queue_wait for r in sent),
        "ttft_from_scheduled_ms": stats(
            r.sent - r.scheduled + r.chunk_times[0]
            for r in ok if r.chunk_times and r.sent is not None
        ),
        "errors": error_counts(records),
    }
    summary["fell_behind"], summary["lag_warning"] = _lag_verdict(
        lag_stats, len(not_sent), max_lag_ms)
    if slo is not None:
        good = sum(1 for r in records if meets_slo(r, slo))
        attainment = good / len(records) if records else 0.0
        summary.update({
            "slo": slo.to_dict(),
            "slo_target": slo_target,
            "good": good,
            "goodput": good * per_s,
            "slo_attainment": attainment,
            "slo_met": bool(records) and attainment >= slo_target,
        })
    return summary


def _lag_verdict(lag_stats: dict[str, Any], not_sent: int,
                 max_lag_ms: float) -> tuple[bool, str | None]:
    p99 = lag_stats.get("p99")
    problems = []
    if p99 is not None and p99 > max_lag_ms:
        problems.append(
            f"p99 schedule lag {p99:.1f} ms > {max_lag_ms:g} ms (max {lag_stats['max']:.1f} ms)"
        )
    if not_sent:
        problems.append(f"{not_sent} scheduled request(s) were never sent")
    if not problems:
        return False, None
    return True, ("THE CLIENT FELL BEHIND ITS SCHEDULE: " + "; ".join(problems)
                  + ". Latencies understate queueing; lower the rate or add --workers.")
