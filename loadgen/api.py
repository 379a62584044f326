"""The Python API: ``await run(config)`` → :class:`RunResult`.

    from loadgen import LoadConfig, SLO, run
    result = await run(LoadConfig(url="http://127.0.0.1:8000", rate=20, duration_s=30,
                                  mix="input-heavy", slo=SLO.parse("ttft:500,tpot:50")))
    print(result.table())
    result.write("results/run.json")        # + results/run.records.jsonl
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from loadgen import report, scrape
from loadgen.client import first_model, make_session, request_headers
from loadgen.config import LoadConfig
from loadgen.metrics import SLO, asked_rate, summarize
from loadgen.progress import LinePrinter, Progress
from loadgen.records import Record, read_jsonl, write_jsonl
from loadgen.runner import build_workload, make_sender, preflight, run_process

SCHEMA = "pdlb.loadgen.result/1"
VERSION = "0.1.0"


def _pdlb_version() -> str | None:
    """The installed pdlb distribution's version (None when loadgen runs from a bare tree)."""
    try:
        return importlib.metadata.version("pdlb")
    except importlib.metadata.PackageNotFoundError:
        return None


def records_path_for(json_path: str | Path) -> Path:
    """``run.json`` → ``run.records.jsonl`` (beside it)."""
    p = Path(json_path)
    stem = p.name[:-5] if p.name.endswith(".json") else p.name
    return p.with_name(stem + ".records.jsonl")


@dataclass
class RunResult:
    """A finished run: its config, per-request records, the summary and run facts."""

    config: dict[str, Any]
    records: list[Record]
    summary: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    pdlb_stages: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return str(self.config.get("label") or self.meta.get("label") or "run")

    @property
    def slo_met(self) -> bool | None:
        """True/False when an SLO was given, else None."""
        return self.summary.get("slo_met") if "slo" in self.summary else None

    def table(self) -> str:
        return report.table(self.summary, self.config, self.meta, self.pdlb_stages)

    def to_dict(self, records_file: str | None = None) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "label": self.label,
            "config": self.config,
            "meta": self.meta,
            "summary": self.summary,
            "pdlb_stages": self.pdlb_stages,
            "records_file": records_file,
        }

    def write(self, path: str | Path, records: bool = True) -> tuple[Path, Path | None]:
        """Write the JSON result and (by default) the per-request JSONL beside it."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        rpath = records_path_for(p) if records else None
        if rpath is not None:
            write_jsonl(self.records, rpath)
        data = self.to_dict(rpath.name if rpath is not None else None)
        p.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
        return p, rpath

    @classmethod
    def load(cls, path: str | Path, with_records: bool = True) -> RunResult:
        """Read a result file (and its records file when present)."""
        p = Path(path)
        try:
            data = orjson.loads(p.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise ValueError(f"{p}: cannot read a loadgen result: {exc}") from exc
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ValueError(f"{p}: not a loadgen result (schema {SCHEMA!r} expected)")
        recs: list[Record] = []
        rf = data.get("records_file")
        if with_records and rf and (p.parent / rf).exists():
            recs = read_jsonl(p.parent / rf)
        return cls(config=data["config"], records=recs, summary=data["summary"],
                   meta=data.get("meta") or {}, pdlb_stages=data.get("pdlb_stages"))

    def recompute(self, slo: SLO | None = None, slo_target: float | None = None,
                  max_lag_ms: float | None = None) -> RunResult:
        """A new result whose summary is recomputed from the records (optionally with
        another SLO). Needs the records."""
        if not self.records:
            raise ValueError("no per-request records loaded; cannot recompute")
        cfg_slo = self.config.get("slo")
        slo = slo or (SLO(**cfg_slo) if cfg_slo else None)
        target = slo_target if slo_target is not None else self.config.get("slo_target", 0.9)
        lag = max_lag_ms if max_lag_ms is not None else self.config.get("max_lag_ms", 5.0)
        summary = summarize(self.records, slo=slo, slo_target=target, max_lag_ms=lag,
                            asked_rate=asked_rate(self.config.get("rate"),
                                                  self.config.get("ramp_to")))
        return RunResult(self.config, self.records, summary, self.meta, self.pdlb_stages)


def render_side_by_side(results: list[RunResult] | list[tuple[str, dict[str, Any]]]) -> str:
    """Two or more runs in columns (what ``pdlb loadgen compare`` prints)."""
    runs = [(r.label, r.summary) if isinstance(r, RunResult) else r for r in results]
    return report.side_by_side(runs)


async def run(
    config: LoadConfig,
    *,
    progress: bool | Callable[[Progress], None] = False,
    stopping: asyncio.Event | None = None,
) -> RunResult:
    """Run ``config`` to completion and return the result (nothing is written).

    ``progress``: True prints a live line on stderr; a callable receives snapshots every
    second. ``stopping``: set it to end the run early (in-flight requests get 2 s).
    """
    called = time.time()
    printer = LinePrinter() if progress is True else None
    callback = printer if printer is not None else (progress if callable(progress) else None)
    session = make_session(4, config.timeout_s)
    before = after = None
    metrics_url = config.metrics_url or config.url.rstrip("/") + "/metrics"
    try:
        hdrs = request_headers(config.headers, config.api_key)
        model = config.model or await first_model(session, config.url, hdrs)
        if config.preflight:
            sender = make_sender(config, session, model)
            try:
                await preflight(sender, config.api_url)
            finally:
                await sender.transport.aclose()
        proc_config = config.replace(preflight=False)

        async def scrape_before() -> None:
            nonlocal before
            before = await scrape.scrape(session, metrics_url)

        hook = scrape_before if config.scrape_metrics else None
        try:
            if config.workers > 1:
                from loadgen.workers import run_workers

                pr = await run_workers(proc_config, model, callback, stopping, hook)
            else:
                pr = await run_process(proc_config, model=model, progress=callback,
                                       workload=build_workload(config), stopping=stopping,
                                       before_start=hook)
        finally:
            if printer is not None:
                printer.close()
        if config.scrape_metrics:
            after = await scrape.scrape(session, metrics_url)
    finally:
        await session.close()
    records = sorted(pr.records, key=lambda r: (r.scheduled, r.index))
    summary = summarize(records, slo=config.slo, slo_target=config.slo_target,
                        max_lag_ms=config.max_lag_ms,
                        asked_rate=asked_rate(config.rate, config.ramp_to))
    meta = dict(pr.meta)
    meta.pop("worker", None)
    meta.setdefault("workers", config.workers)
    meta["model"] = model
    meta["started_at"] = datetime.fromtimestamp(called, UTC).isoformat()
    if meta.get("first_send") is not None and meta.get("t0_epoch") is not None:
        meta["time_to_first_send_s"] = meta["t0_epoch"] + meta["first_send"] - called
    meta["loadgen_version"] = VERSION
    meta["pdlb_version"] = _pdlb_version()
    meta["python"] = sys.version.split()[0]
    meta["host"] = platform.node()
    stages: dict[str, Any] | None = None
    if config.scrape_metrics:
        if before is None or after is None:
            stages = {"stages": {}, "missing": list(scrape.STAGES.values()),
                      "note": f"no readable /metrics at {metrics_url}"}
        else:
            stages = scrape.breakdown(before, after)
    cfg = config.to_dict()
    return RunResult(cfg, records, summary, meta, stages)
