"""PNG plots (optional: needs matplotlib, ``pip install 'pdlb[plots]'``).

- latency CDFs (TTFT, TPOT, ITL, E2EL) of one or more runs, from their records;
- TTFT / TPOT / ITL / E2EL percentiles, SLO attainment and goodput against rate, for a sweep.

With an SLO, each threshold is a labelled dashed line on its metric's panel (TTFT, TPOT,
E2EL; there is no ITL SLO). Given ``settings`` (lines from
:func:`loadgen.report.settings_lines`), the figure carries them under the panels, so a saved
PNG says what run it shows.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loadgen.metrics import itls, tpot
from loadgen.records import Record

# SLO key → (name on the lines' labels, CDF panel index, sweep panel index)
SLO_PANELS: dict[str, tuple[str, int, int]] = {
    "ttft_ms": ("TTFT", 0, 0), "tpot_ms": ("TPOT", 1, 1), "e2el_ms": ("E2EL", 3, 3)}
SLO_COLORS = ("red", "darkred", "orangered", "crimson")
SETTINGS_GID = "loadgen-settings"
_LINE_IN = 0.16  # inches per settings line at the font size below
_FONT = 7.5


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


def slo_label(key: str, value: float, runs: Sequence[str] = ()) -> str:
    """The legend label of one threshold line: ``SLO TTFT ≤ 500 ms`` (+ the runs it is for)."""
    text = f"SLO {SLO_PANELS[key][0]} ≤ {value:g} ms"
    return text + (f" ({', '.join(runs)})" if runs else "")


def _thresholds(labels: Sequence[str],
                slos: Sequence[Mapping[str, float] | None]) -> list[tuple[str, float, str]]:
    """(key, ms, label) per distinct threshold. A threshold that not every run has names
    the runs it belongs to."""
    owners: dict[tuple[str, float], list[str]] = {}
    for label, slo in zip(labels, slos, strict=True):
        for key, value in (slo or {}).items():
            if key in SLO_PANELS and value is not None:
                owners.setdefault((key, float(value)), []).append(label)
    return [(key, value, slo_label(key, value, () if len(runs) == len(labels) else runs))
            for (key, value), runs in owners.items()]


def _figure(plt: Any, nrows: int, ncols: int, size: tuple[float, float],
            settings: Sequence[str] | None) -> tuple[Any, Any, float]:
    """A figure with room under the panels for the settings text; returns (fig, axes,
    bottom fraction reserved for the text)."""
    width, height = size
    chars = int(width * 72 / (_FONT * 0.62))  # monospace glyphs are ~0.6 em wide
    lines = [w for line in (settings or ())
             for w in (textwrap.wrap(line, chars, subsequent_indent="    ") or [""])]
    extra = (_LINE_IN * len(lines) + 0.15) if lines else 0.0
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height + extra))
    bottom = extra / (height + extra)
    if lines:
        text = fig.text(0.01, 0.04 / (height + extra), "\n".join(lines), ha="left",
                        va="bottom", fontsize=_FONT, family="monospace", linespacing=1.25)
        text.set_gid(SETTINGS_GID)
    return fig, axes, bottom


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _cdf(ax: Any, values: list[float], label: str) -> None:
    if not values:
        return
    vals = sorted(values)
    n = len(vals)
    ax.plot(vals, [(i + 1) / n for i in range(n)], label=label)


def cdf_figure(runs: Sequence[tuple[str, Sequence[Record]]], *,
               slo: Mapping[str, float] | None = None,
               run_slos: Sequence[Mapping[str, float] | None] | None = None,
               settings: Sequence[str] | None = None, title: str | None = None) -> Any:
    """The CDF figure (not saved): four panels, TTFT, TPOT, ITL and E2EL CDFs (ms) of each
    run. ``slo`` (``{"ttft_ms": 500, ...}``) applies to every run, ``run_slos`` gives one
    per run; each threshold is a vertical dashed line on its panel. ``settings``: lines of
    text under the panels."""
    plt = _pyplot()
    fig, axes, bottom = _figure(plt, 2, 2, (11.0, 8.0), settings)
    panels: tuple[tuple[str, Callable[[Sequence[Record]], list[float]]], ...] = (
        ("TTFT (ms)", lambda rs: [r.chunk_times[0] * 1e3 for r in rs if r.ok and r.chunk_times]),
        ("TPOT (ms)", lambda rs: [v * 1e3 for r in rs if (v := tpot(r)) is not None]),
        ("ITL per chunk (ms)", lambda rs: [g * 1e3 for r in rs for g in itls(r)]),
        ("E2E latency (ms)",
         lambda rs: [r.chunk_times[-1] * 1e3 for r in rs if r.ok and r.chunk_times]),
    )
    flat = list(axes.flat)
    for ax, (name, get) in zip(flat, panels, strict=True):
        for label, recs in runs:
            _cdf(ax, get(recs), label)
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests" if "ITL" not in name else "fraction of gaps")
        ax.grid(True, alpha=0.3)
    labels = [label for label, _ in runs]
    slos = list(run_slos) if run_slos is not None else [slo] * len(runs)
    drawn = [0] * len(flat)
    for key, value, label in _thresholds(labels, slos):
        i = SLO_PANELS[key][1]
        flat[i].axvline(value, color=SLO_COLORS[drawn[i] % len(SLO_COLORS)], linestyle="--",
                        linewidth=1.2, label=label)
        drawn[i] += 1
    for ax in flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title or "Latency CDFs (vLLM bench serve definitions)"
                 + (f": {labels[0]}" if len(labels) == 1 else ""))
    fig.tight_layout(rect=(0.0, bottom, 1.0, 1.0))
    return fig


def plot_cdfs(runs: Sequence[tuple[str, Sequence[Record]]], path: str | Path, *,
              slo: Mapping[str, float] | None = None,
              run_slos: Sequence[Mapping[str, float] | None] | None = None,
              settings: Sequence[str] | None = None) -> Path:
    """Write :func:`cdf_figure` as a PNG."""
    plt = _pyplot()
    fig = cdf_figure(runs, slo=slo, run_slos=run_slos, settings=settings)
    return _save(plt, fig, path)


def _series(rows: Sequence[Mapping[str, Any]], key: str, scale: float = 1.0) -> list[float]:
    return [math.nan if r.get(key) is None else r[key] * scale for r in rows]


def sweep_figure(rows: Sequence[Mapping[str, Any]], slo: Mapping[str, float] | None = None,
                 target: float | None = None,
                 settings: Sequence[str] | None = None) -> Any:
    """The sweep figure (not saved): TTFT, TPOT, ITL, E2EL (p50, p99), SLO attainment and
    goodput against request rate; each SLO threshold and the attainment target is a
    horizontal dashed line."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r["rate"])
    rates = [r["rate"] for r in rows]
    fig, axes, bottom = _figure(plt, 2, 3, (15.0, 8.0), settings)
    flat = list(axes.flat)
    for ax, (name, key) in zip(flat[:4], (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"),
                                          ("E2EL", "e2el")), strict=True):
        for pct in ("p50", "p99"):
            ys = _series(rows, f"{key}_{pct}_ms")
            if not all(math.isnan(y) for y in ys):
                ax.plot(rates, ys, marker="o", label=f"{name} {pct}")
        ax.set_ylabel(f"{name} (ms)")
    for key, value, label in _thresholds(["sweep"], [slo]):
        flat[SLO_PANELS[key][2]].axhline(value, color="red", linestyle="--", label=label)
    ax = flat[4]
    ax.plot(rates, _series(rows, "slo_attainment", 100.0), marker="o", label="SLO attainment")
    if target is not None:
        ax.axhline(target * 100, color="red", linestyle="--", label=f"target {target * 100:g}%")
    ax.set_ylabel("attainment (%)")
    ax = flat[5]
    ax.plot(rates, _series(rows, "goodput"), marker="o", label="goodput")
    ax.plot(rates, _series(rows, "request_throughput"), marker="o", label="throughput")
    ax.set_ylabel("req/s")
    for ax in flat:
        ax.set_xlabel("request rate (req/s)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    limits = [f"{SLO_PANELS[k][0]} ≤ {v:g} ms" for k, v in (slo or {}).items()
              if k in SLO_PANELS]
    fig.suptitle("Latency vs rate" + (f" (SLO {', '.join(limits)})" if limits else ""))
    fig.tight_layout(rect=(0.0, bottom, 1.0, 1.0))
    return fig


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | Path,
               slo: Mapping[str, float] | None = None, target: float | None = None,
               settings: Sequence[str] | None = None) -> Path:
    """Write :func:`sweep_figure` as a PNG."""
    plt = _pyplot()
    fig = sweep_figure(rows, slo, target, settings)
    return _save(plt, fig, path)
