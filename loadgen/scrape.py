"""pdlb's per-stage breakdown from its Prometheus ``/metrics``, scraped before and after a run.

Each stage histogram's ``_sum``/``_count`` deltas give the mean time per request in that
stage during the run; bucket deltas give estimated percentiles (Prometheus's
``histogram_quantile`` interpolation). Label sets are added together. Missing metrics (not a
pdlb, or an older one) are skipped with a note, never an error.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import aiohttp

STAGES: dict[str, str] = {
    "prefill": "pdlb_prefill_duration_seconds",
    "handoff": "pdlb_handoff_duration_seconds",
    "decode": "pdlb_decode_duration_seconds",
    "ttft": "pdlb_ttft_seconds",
    "e2e": "pdlb_e2e_duration_seconds",
}

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LE = re.compile(r'le="([^"]+)"')


@dataclass
class Histogram:
    sum: float = 0.0
    count: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # le → cumulative count


def parse(text: str) -> dict[str, Histogram]:
    """Histograms by base name (label sets summed)."""
    out: dict[str, Histogram] = defaultdict(Histogram)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        name, labels, raw = m.groups()
        try:
            value = float(raw)
        except ValueError:
            continue
        if name.endswith("_sum"):
            out[name[:-4]].sum += value
        elif name.endswith("_count"):
            out[name[:-6]].count += value
        elif name.endswith("_bucket") and labels:
            le = _LE.search(labels)
            if le:
                bound = math.inf if le.group(1) == "+Inf" else float(le.group(1))
                h = out[name[:-7]]
                h.buckets[bound] = h.buckets.get(bound, 0.0) + value
    return dict(out)


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus-style quantile estimate from cumulative bucket counts."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    rank = q * items[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in items:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def breakdown(before: dict[str, Histogram], after: dict[str, Histogram]) -> dict[str, Any]:
    """Per-stage mean and p50/p90/p99 (ms) of the requests observed between two scrapes."""
    stages: dict[str, Any] = {}
    missing = []
    for stage, metric in STAGES.items():
        a = after.get(metric)
        if a is None:
            missing.append(metric)
            continue
        b = before.get(metric, Histogram())
        count = a.count - b.count
        total = a.sum - b.sum
        delta = {le: a.buckets[le] - b.buckets.get(le, 0.0) for le in a.buckets}
        entry: dict[str, Any] = {
            "count": int(count),
            "mean_ms": total / count * 1000.0 if count > 0 else None,
        }
        for q in (0.5, 0.9, 0.99):
            v = quantile(q, delta) if count > 0 else None
            entry[f"p{int(q * 100)}_ms"] = v * 1000.0 if v is not None else None
        stages[stage] = entry
    return {"stages": stages, "missing": missing,
            "note": "from pdlb /metrics histogram deltas; percentiles are bucket estimates"}


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, Histogram] | None:
    """GET a /metrics page; None when it is absent or unreadable."""
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return None
            return parse(await resp.text())
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
        return None
