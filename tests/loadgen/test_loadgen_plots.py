"""Plots: PNGs when matplotlib is there, a clear message (not a crash) when it is not; SLO
thresholds drawn as labelled lines; the run's settings carried in the figure."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from loadgen.api import RunResult
from loadgen.cli import main
from loadgen.config import LoadConfig
from loadgen.metrics import SLO, summarize
from loadgen.plots import (
    SETTINGS_GID,
    PlotUnavailable,
    cdf_figure,
    plot_cdfs,
    plot_sweep,
    sweep_figure,
)
from loadgen.records import Record
from loadgen.report import settings_lines

StartServer = Callable[..., Awaitable[tuple[str, web.Application]]]
META = {"model": "tiny", "workers": 1, "started_at": "2026-11-24T10:11:12.5+00:00",
        "loadgen_version": "0.1.0", "pdlb_version": "0.1.0"}


def _records() -> list[Record]:
    return [Record(index=i, scheduled=i * 0.1, sent=i * 0.1, ok=True, finished=0.05,
                   chunk_times=[0.01 + i * 0.001, 0.02 + i * 0.001, 0.05], output_tokens=3)
            for i in range(20)]


def _rows() -> list[dict[str, Any]]:
    return [{"rate": r, "ttft_p50_ms": 10.0 * r, "ttft_p99_ms": 20.0 * r, "tpot_p50_ms": 1.0,
             "tpot_p99_ms": 2.0, "itl_p50_ms": 1.0, "itl_p99_ms": 3.0, "e2el_p50_ms": 40.0,
             "e2el_p99_ms": 50.0 * r, "slo_attainment": 1.0 / r, "goodput": 1.0,
             "request_throughput": r} for r in (1.0, 2.0, 4.0)]


def _config(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(url="http://user:secret@127.0.0.1:8000", rate=20,
                                duration_s=60, mix="input-heavy", label="pd", seed=7,
                                slo=SLO.parse("ttft:30,tpot:5,e2el:60"))
    base.update(kw)
    return LoadConfig(**base).to_dict()


@pytest.fixture
def plt() -> Iterator[Any]:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as pyplot

    yield pyplot
    pyplot.close("all")


def _slo_lines(ax: Any) -> list[Any]:
    """Threshold lines (labelled "SLO <metric> ≤ <ms> ms"), not the "SLO attainment" curve."""
    return [ln for ln in ax.get_lines()
            if str(ln.get_label()).startswith("SLO ") and "≤" in str(ln.get_label())]


def _settings(fig: Any) -> str:
    texts = [t.get_text() for t in fig.texts if t.get_gid() == SETTINGS_GID]
    assert len(texts) == 1
    return str(texts[0])


def test_plots_written(tmp_path: Path, plt: Any) -> None:
    """CDFs of runs and a sweep's latency-vs-rate figure are written as PNG."""
    cdf = plot_cdfs([("a", _records()), ("b", _records()[:5])], tmp_path / "cdf.png",
                    slo={"ttft_ms": 30.0}, settings=settings_lines(_config(), META))
    assert cdf.read_bytes()[:4] == b"\x89PNG"
    png = plot_sweep(_rows(), tmp_path / "sweep.png", {"ttft_ms": 30.0}, 0.9,
                     settings_lines({**_config(), "rate": None}, META, sweep_rates=[1, 2, 4]))
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert plt.get_fignums() == []  # saved figures are closed


def test_cdf_figure_marks_each_slo_threshold(plt: Any) -> None:
    """With an SLO, TTFT / TPOT / E2EL panels get a labelled vertical line at the limit;
    the ITL panel (no ITL SLO) gets none; the legends name the thresholds."""
    fig = cdf_figure([("pd", _records())], slo={"ttft_ms": 30.0, "tpot_ms": 5.0,
                                                 "e2el_ms": 60.0})
    ttft, tpot, itl, e2el = fig.axes[:4]
    for ax, label, ms in ((ttft, "SLO TTFT ≤ 30 ms", 30.0), (tpot, "SLO TPOT ≤ 5 ms", 5.0),
                          (e2el, "SLO E2EL ≤ 60 ms", 60.0)):
        (line,) = _slo_lines(ax)
        assert line.get_label() == label
        assert list(line.get_xdata()) == [ms, ms]  # vertical: x fixed at the limit
        assert label in [t.get_text() for t in ax.get_legend().get_texts()]
    assert _slo_lines(itl) == []
    assert "pd" in fig._suptitle.get_text()


def test_cdf_figure_carries_the_run_settings(plt: Any) -> None:
    """The settings text names host:port (no credentials), endpoint, rate and arrival
    process, duration, lengths, workload, SLO, date and versions."""
    lines = settings_lines(_config(max_concurrency=64), META, None)
    fig = cdf_figure([("pd", _records())], slo={"ttft_ms": 30.0}, settings=lines)
    text = _settings(fig)
    for part in ("127.0.0.1:8000", "/v1/completions", "model tiny", "poisson", "20 req/s",
                 "max 64 in flight", "60 s", "mix input-heavy", "input 2048±512 [512–4096] tok",
                 "output 128±32 [32–256] tok", "seed 7", "ttft ≤ 30 ms", "tpot ≤ 5 ms",
                 "attainment target 90%", "label pd", "started 2026-11-24 10:11 UTC",
                 "loadgen 0.1.0", "pdlb 0.1.0"):
        assert part in text, part
    assert "secret" not in text and "user" not in text


def test_no_slo_no_threshold_lines(plt: Any) -> None:
    """Without an SLO: no threshold line on any panel (CDF or sweep), no target line, and
    no settings text when none is given."""
    fig = cdf_figure([("a", _records()), ("b", _records())])
    assert all(_slo_lines(ax) == [] for ax in fig.axes)
    assert all(len(ax.get_lines()) == 2 for ax in fig.axes)  # just the two runs' CDFs
    assert [t for t in fig.texts if t.get_gid() == SETTINGS_GID] == []
    sw = sweep_figure(_rows())
    assert all(_slo_lines(ax) == [] for ax in sw.axes)
    assert not any(str(ln.get_label()).startswith("target") for ax in sw.axes
                   for ln in ax.get_lines())
    no_slo = settings_lines(_config(slo=None), META)
    assert not any(line.startswith("SLO") for line in no_slo)


def test_sweep_figure_marks_slo_and_target(plt: Any) -> None:
    """A sweep's TTFT / TPOT / E2EL panels get horizontal lines at the limits, the
    attainment panel one at the target; the settings name the swept rates."""
    fig = sweep_figure(_rows(), {"ttft_ms": 30.0, "tpot_ms": 5.0, "e2el_ms": 150.0}, 0.9,
                       settings_lines({**_config(), "rate": None}, META, sweep_rates=[4, 1, 2]))
    ttft, tpot, itl, e2el, attain, _goodput = fig.axes[:6]
    for ax, label, ms in ((ttft, "SLO TTFT ≤ 30 ms", 30.0), (tpot, "SLO TPOT ≤ 5 ms", 5.0),
                          (e2el, "SLO E2EL ≤ 150 ms", 150.0)):
        (line,) = _slo_lines(ax)
        assert line.get_label() == label
        assert list(line.get_ydata()) == [ms, ms]  # horizontal: y fixed at the limit
    assert _slo_lines(itl) == []
    (target,) = [ln for ln in attain.get_lines() if ln.get_label() == "target 90%"]
    assert list(target.get_ydata()) == [90.0, 90.0]
    text = _settings(fig)
    assert "sweep" in text and "rates 1, 2, 4 req/s" in text and "60 s per step" in text


def test_compare_names_the_runs_a_threshold_belongs_to(plt: Any) -> None:
    """Overlaid runs with different SLOs: one line per distinct limit, naming its runs; a
    limit all runs share is drawn once, unnamed."""
    fig = cdf_figure([("a", _records()), ("b", _records())],
                     run_slos=[{"ttft_ms": 30.0, "tpot_ms": 5.0}, {"ttft_ms": 20.0,
                                                                  "tpot_ms": 5.0}])
    labels = sorted(str(ln.get_label()) for ln in _slo_lines(fig.axes[0]))
    assert labels == ["SLO TTFT ≤ 20 ms (b)", "SLO TTFT ≤ 30 ms (a)"]
    assert [ln.get_label() for ln in _slo_lines(fig.axes[1])] == ["SLO TPOT ≤ 5 ms"]


def test_settings_lines_closed_loop_and_dataset(tmp_path: Path) -> None:
    """Closed loop and dataset runs describe themselves too (users, dataset file)."""
    ds = tmp_path / "prompts.jsonl"
    ds.write_text('{"prompt": "hi"}\n')
    text = "\n".join(settings_lines(LoadConfig(
        url="https://example.com", concurrency=8, num_requests=100, dataset=str(ds),
        endpoint="chat").to_dict(), {}))
    assert "example.com /v1/chat/completions" in text
    assert "closed loop, 8 users; 100 requests" in text
    assert "dataset prompts.jsonl" in text and "SLO" not in text


def _keep_figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Collect every figure the plot functions save (they still write the PNG)."""
    import loadgen.plots

    figures: list[Any] = []
    save = loadgen.plots._save

    def keep(pyplot: Any, fig: Any, path: str | Path) -> Path:
        figures.append(fig)
        return save(pyplot, fig, path)

    monkeypatch.setattr(loadgen.plots, "_save", keep)
    return figures


async def test_cli_run_and_sweep_plots(fake_server: StartServer, tmp_path: Path, plt: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``run --plot`` and ``sweep --plot`` against a live (fake) server: the PNGs carry the
    SLO lines and the settings (this server's port, the rate(s) sent)."""
    figures = _keep_figures(monkeypatch)
    url, _ = await fake_server()
    port = url.rsplit(":", 1)[1]
    common = ["--input-len", "16", "--output-len", "8", "--no-progress", "-q",
              "--max-lag-ms", "1000"]
    rc = await asyncio.to_thread(main, ["--url", url, "--rate", "100", "-n", "10", "--slo",
                                        "ttft:5000,tpot:50", "--out", str(tmp_path / "r.json"),
                                        "--plot", *common])
    assert rc == 0 and (tmp_path / "r.cdf.png").exists()
    fig = figures[-1]
    assert [ln.get_label() for ln in _slo_lines(fig.axes[0])] == ["SLO TTFT ≤ 5000 ms"]
    assert [ln.get_label() for ln in _slo_lines(fig.axes[1])] == ["SLO TPOT ≤ 50 ms"]
    text = _settings(fig)
    assert f"127.0.0.1:{port} /v1/completions" in text and "100 req/s" in text
    assert "input 16 tok" in text and "output 8 tok" in text and "10 requests" in text

    rc = await asyncio.to_thread(main, ["sweep", "--url", url, "--rates", "20,40",
                                        "--duration", "0.3", "--slo", "ttft:5000",
                                        "--out", str(tmp_path / "s.json"), "--plot", *common])
    assert rc == 0 and (tmp_path / "s.png").exists()
    fig = figures[-1]
    assert [list(ln.get_ydata()) for ln in _slo_lines(fig.axes[0])] == [[5000.0, 5000.0]]
    assert "rates 20, 40 req/s" in _settings(fig)


def test_cli_report_plot_uses_the_runs_slo_and_settings(tmp_path: Path, plt: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``report --plot`` draws the result's SLO (a recomputed one when --slo is given) and
    writes the run's settings into the PNG's figure."""
    figures = _keep_figures(monkeypatch)
    slo = SLO.parse("ttft:30,e2el:60")
    recs = _records()
    result = RunResult(_config(slo=slo), recs, summarize(recs, slo=slo), META)
    out = tmp_path / "run.json"
    result.write(out)
    assert main(["report", str(out), "--plot"]) == 0
    assert (tmp_path / "run.cdf.png").read_bytes()[:4] == b"\x89PNG"
    fig = figures[-1]
    assert [ln.get_label() for ln in _slo_lines(fig.axes[0])] == ["SLO TTFT ≤ 30 ms"]
    assert [ln.get_label() for ln in _slo_lines(fig.axes[3])] == ["SLO E2EL ≤ 60 ms"]
    assert "127.0.0.1:8000" in _settings(fig) and "20 req/s" in _settings(fig)

    main(["report", str(out), "--slo", "ttft:25", "--plot"])
    fig = figures[-1]
    assert [ln.get_label() for ln in _slo_lines(fig.axes[0])] == ["SLO TTFT ≤ 25 ms"]
    assert _slo_lines(fig.axes[3]) == []
    assert "ttft ≤ 25 ms" in _settings(fig)


def test_missing_matplotlib_is_a_clear_error(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Without matplotlib: PlotUnavailable saying what to install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotUnavailable, match="pip install matplotlib"):
        plot_cdfs([("a", _records())], tmp_path / "x.png")
