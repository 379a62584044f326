"""Rate sweeps and DistServe's goodput: the highest rate whose SLO attainment ≥ target.

Two ways: a fixed list of rates (each run once, in order), or a search that doubles the rate
from ``start`` until attainment drops below the target (or ``max_rate``), then bisects
between the last passing and the first failing rate. Attainment counts failed requests as
misses. A client that fell behind its schedule makes a step untrustworthy: the step is
reported and the search stops there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from loadgen.api import RunResult, run
from loadgen.config import LoadConfig
from loadgen.progress import Progress

SWEEP_SCHEMA = "pdlb.loadgen.sweep/1"


@dataclass
class SweepStep:
    rate: float
    result: RunResult

    @property
    def attainment(self) -> float:
        return float(self.result.summary.get("slo_attainment", 0.0))

    @property
    def passed(self) -> bool:
        return bool(self.result.summary.get("slo_met")) and not self.result.summary.get(
            "fell_behind")

    def row(self) -> dict[str, Any]:
        s = self.result.summary
        passed = self.passed

        def pick(key: str, sub: str) -> Any:
            return (s.get(key) or {}).get(sub)

        return {
            "rate": self.rate, "slo_attainment": s.get("slo_attainment"),
            "goodput": s.get("goodput"), "request_throughput": s.get("request_throughput"),
            "completed": s.get("completed"), "failed": s.get("failed"),
            "fell_behind": s.get("fell_behind"),
            "ttft_p50_ms": pick("ttft_ms", "p50"), "ttft_p99_ms": pick("ttft_ms", "p99"),
            "tpot_p50_ms": pick("tpot_ms", "p50"), "tpot_p99_ms": pick("tpot_ms", "p99"),
            "itl_p50_ms": pick("itl_ms", "p50"), "itl_p99_ms": pick("itl_ms", "p99"),
            "e2el_p50_ms": pick("e2el_ms", "p50"), "e2el_p99_ms": pick("e2el_ms", "p99"),
            "schedule_lag_p99_ms": pick("schedule_lag_ms", "p99"),
            "passed": passed,
        }


@dataclass
class SweepResult:
    config: dict[str, Any]
    steps: list[SweepStep] = field(default_factory=list)
    max_rate: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SWEEP_SCHEMA, "config": self.config,
                "slo": self.config.get("slo"), "slo_target": self.config.get("slo_target"),
                "max_rate_meeting_slo": self.max_rate, "note": self.note,
                "steps": [s.row() for s in self.steps]}

    def table(self) -> str:
        return sweep_table(self.to_dict())

    def write(self, path: str | Path, step_results: bool = True) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if step_results:
            stem = p.name[:-5] if p.name.endswith(".json") else p.name
            files = []
            for st in self.steps:
                sp = p.with_name(f"{stem}.rate{st.rate:g}.json")
                st.result.write(sp)
                files.append(sp.name)
            data["step_files"] = files
        p.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
        return p


async def sweep(
    config: LoadConfig,
    *,
    rates: Sequence[float] | None = None,
    start: float = 1.0,
    max_rate: float = 1000.0,
    bisect_steps: int = 4,
    progress: bool | Callable[[Progress], None] = False,
    on_step: Callable[[SweepStep], None] | None = None,
) -> SweepResult:
    """Find the highest rate that meets ``config.slo`` at ``config.slo_target``."""
    if config.slo is None:
        raise ValueError("a sweep needs an SLO (--slo ttft:MS,tpot:MS,...)")
    if config.duration_s is None and config.num_requests is None:
        raise ValueError("a sweep needs --duration or --num-requests per step")
    if rates is not None and not rates:
        raise ValueError("empty list of rates")
    if not 0 < start <= max_rate:
        raise ValueError(f"need 0 < start ({start}) <= max rate ({max_rate})")
    out = SweepResult(config={**config.to_dict(), "rate": None})

    async def step(rate: float) -> SweepStep:
        cfg = config.replace(rate=rate, concurrency=None,
                             label=f"{config.label or 'sweep'}@{rate:g}")
        st = SweepStep(rate, await run(cfg, progress=progress))
        out.steps.append(st)
        if on_step is not None:
            on_step(st)
        return st

    if rates is not None:
        best = None
        for r in sorted(rates):
            st = await step(r)
            if not st.passed:
                break
            best = r
        out.max_rate = best
        later = [s.rate for s in out.steps if s.passed and best is not None and s.rate > best]
        out.note = "(stopped at the first miss)" if len(out.steps) < len(rates) else ""
        if later:
            out.note += f" note: higher rates {later} passed after a miss"
        return out

    good: float | None = None
    bad: float | None = None
    r = start
    while True:
        st = await step(r)
        if st.result.summary.get("fell_behind"):
            bad = r
            out.note = "(the client fell behind: add --workers or lower max rate)"
            break
        if st.passed:
            good = r
            if r >= max_rate:
                out.note = "(reached the max rate without a miss)"
                break
            r = min(r * 2.0, max_rate)
        else:
            bad = r
            break
    if good is not None and bad is not None:
        for _ in range(bisect_steps):
            mid = (good + bad) / 2.0
            st = await step(mid)
            if st.passed:
                good = mid
            else:
                bad = mid
    out.max_rate = good
    return out


def sweep_table(data: dict[str, Any]) -> str:
    """The console table of a sweep (from :meth:`SweepResult.to_dict` or its JSON file)."""
    head = (f"{'rate':>9} {'attain %':>9} {'goodput':>9} {'req/s':>9} {'TTFT p99':>10} "
            f"{'TPOT p99':>9} {'ITL p99':>9} {'lag p99':>8}  verdict")
    lines = [head, "-" * len(head)]

    def f(v: Any, nd: int = 1) -> str:
        return "-" if v is None else f"{v:.{nd}f}"

    for r in sorted(data.get("steps", []), key=lambda r: r["rate"]):
        verdict = "pass" if r.get("passed") else (
            "CLIENT BEHIND" if r.get("fell_behind") else "miss")
        lines.append(
            f"{r['rate']:>9.2f} {f((r['slo_attainment'] or 0) * 100, 2):>9} "
            f"{f(r['goodput'], 2):>9} {f(r['request_throughput'], 2):>9} "
            f"{f(r['ttft_p99_ms']):>10} {f(r['tpot_p99_ms'], 2):>9} "
            f"{f(r['itl_p99_ms'], 2):>9} {f(r['schedule_lag_p99_ms'], 2):>8}  {verdict}")
    target = (data.get("slo_target") or 0.9) * 100
    best = data.get("max_rate_meeting_slo")
    best_s = f"{best:.2f} req/s" if best is not None else "none"
    lines.append(f"Highest rate with SLO attainment ≥ {target:g}%: {best_s}  "
                 f"{data.get('note', '')}".rstrip())
    return "\n".join(lines)
