"""Plots: PNGs when matplotlib is there, a clear message (not a crash) when it is not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loadgen.plots import PlotUnavailable, plot_cdfs, plot_sweep
from loadgen.records import Record


def _records() -> list[Record]:
    return [Record(index=i, scheduled=i * 0.1, sent=i * 0.1, ok=True, finished=0.05,
                   chunk_times=[0.01 + i * 0.001, 0.02 + i * 0.001, 0.05], output_tokens=3)
            for i in range(20)]


def test_plots_written(tmp_path: Path) -> None:
    """CDFs of runs and a sweep's latency-vs-rate figure are written as PNG."""
    pytest.importorskip("matplotlib")
    cdf = plot_cdfs([("a", _records()), ("b", _records()[:5])], tmp_path / "cdf.png")
    assert cdf.read_bytes()[:4] == b"\x89PNG"
    rows = [{"rate": r, "ttft_p50_ms": 10.0 * r, "ttft_p99_ms": 20.0 * r, "tpot_p50_ms": 1.0,
             "tpot_p99_ms": 2.0, "itl_p50_ms": 1.0, "itl_p99_ms": 3.0,
             "slo_attainment": 1.0 / r} for r in (1.0, 2.0, 4.0)]
    png = plot_sweep(rows, tmp_path / "sweep.png", {"ttft_ms": 30.0}, 0.9)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_missing_matplotlib_is_a_clear_error(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Without matplotlib: PlotUnavailable saying what to install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotUnavailable, match="pip install matplotlib"):
        plot_cdfs([("a", _records())], tmp_path / "x.png")
