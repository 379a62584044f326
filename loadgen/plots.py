"""PNG plots (optional: needs matplotlib, ``pip install 'pdlb[plots]'``).

- latency CDFs (TTFT, TPOT, ITL, E2EL) of one or more runs, from their records;
- TTFT / TPOT / ITL percentiles and SLO attainment against rate, for a sweep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loadgen.metrics import itls, tpot
from loadgen.records import Record


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise PlotUnavailable(
            "plots need matplotlib: pip install matplotlib (or 'pdlb[plots]'); "
            "the run's JSON and records were still written") from exc
    return plt


def _cdf(ax: Any, values: list[float], label: str) -> None:
    if not values:
        return
    vals = sorted(values)
    n = len(vals)
    ax.plot(vals, [(i + 1) / n for i in range(n)], label=label)


def plot_cdfs(runs: Sequence[tuple[str, Sequence[Record]]], path: str | Path) -> Path:
    """One figure, four panels: TTFT, TPOT, ITL and E2EL CDFs (ms) for each run."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels: tuple[tuple[str, Callable[[Sequence[Record]], list[float]]], ...] = (
        ("TTFT (ms)", lambda rs: [r.chunk_times[0] * 1e3 for r in rs if r.ok and r.chunk_times]),
        ("TPOT (ms)", lambda rs: [v * 1e3 for r in rs if (v := tpot(r)) is not None]),
        ("ITL per chunk (ms)", lambda rs: [g * 1e3 for r in rs for g in itls(r)]),
        ("E2E latency (ms)",
         lambda rs: [r.chunk_times[-1] * 1e3 for r in rs if r.ok and r.chunk_times]),
    )
    for ax, (title, get) in zip(axes.flat, panels, strict=True):
        for label, recs in runs:
            _cdf(ax, get(recs), label)
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests" if "ITL" not in title else "fraction of gaps")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Latency CDFs (vLLM bench serve definitions)")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | Path,
               slo: dict[str, float] | None = None, target: float | None = None) -> Path:
    """TTFT, TPOT, ITL (p50 and p99) and SLO attainment against request rate."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r["rate"])
    rates = [r["rate"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (name, key, slo_key) in zip(axes.flat[:3], (
            ("TTFT", "ttft", "ttft_ms"), ("TPOT", "tpot", "tpot_ms"), ("ITL", "itl", None)),
            strict=True):
        for pct in ("p50", "p99"):
            ax.plot(rates, [r.get(f"{key}_{pct}_ms") for r in rows], marker="o",
                    label=f"{name} {pct}")
        if slo and slo_key and slo_key in slo:
            ax.axhline(slo[slo_key], color="red", linestyle="--", label="SLO")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes.flat[3]
    ax.plot(rates, [(r.get("slo_attainment") or 0) * 100 for r in rows], marker="o",
            label="SLO attainment")
    if target is not None:
        ax.axhline(target * 100, color="red", linestyle="--", label="target")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("attainment (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("Latency vs rate")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
