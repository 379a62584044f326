"""The CLI: run/report/compare/sweep, files written, exit status for CI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from loadgen.cli import base_url, main

StartServer = Callable[..., Awaitable[tuple[str, web.Application]]]
COMMON = ["--input-len", "16", "--output-len", "8", "--no-progress", "-q", "--max-lag-ms", "1000"]


async def cli(*argv: str) -> int:
    """Run the CLI in a thread (it owns its event loop); the server stays on ours."""
    return await asyncio.to_thread(main, list(argv))


async def test_run_writes_files_and_exit_status(fake_server: StartServer, tmp_path: Path) -> None:
    """--out writes JSON + JSONL; a met SLO exits 0, a missed SLO exits 1."""
    url, _ = await fake_server()
    out = tmp_path / "ok.json"
    rc = await cli("--url", url, "--rate", "100", "-n", "10", "--slo", "ttft:5000,e2el:9000",
                   "--out", str(out), "--label", "ok", *COMMON)
    assert rc == 0
    data = orjson.loads(out.read_bytes())
    s = data["summary"]
    assert s["completed"] == 10 and s["slo_met"] is True
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "schedule_lag_ms"):
        assert set(s[key]) >= {"mean", "p50", "p90", "p99", "max"}
    assert data["config"]["rate"] == 100
    assert (tmp_path / "ok.records.jsonl").read_text().count("\n") == 10
    bad = tmp_path / "bad.json"
    rc = await cli("--url", url, "--rate", "100", "-n", "10", "--slo", "ttft:0.001",
                   "--out", str(bad), "--label", "bad", *COMMON)
    assert rc == 1

    rc = await cli("report", str(out), "--slo", "ttft:0.001")
    assert rc == 1
    rc = await cli("report", str(out))
    assert rc == 0
    rc = await cli("compare", str(out), str(bad))
    assert rc == 0


async def test_url_in_the_openai_sdk_form_works(fake_server: StartServer, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """--url http://host:port/v1 (the OpenAI SDK's base URL) runs against http://host:port,
    with a note on stderr saying so."""
    url, _ = await fake_server()
    out = tmp_path / "v1.json"
    rc = await cli("--url", url + "/v1/", "--rate", "100", "-n", "3", "--out", str(out),
                   *COMMON)
    assert rc == 0
    data = orjson.loads(out.read_bytes())
    assert data["summary"]["completed"] == 3
    assert data["config"]["url"] == url
    # 3 Poisson arrivals draw a schedule whose own rate is not 100: offered is what was asked
    assert data["summary"]["offered_rate"] == 100.0
    assert data["summary"]["scheduled_rate"] != 100.0
    err = capsys.readouterr().err
    assert f"note: --url {url}/v1/: using {url} (loadgen adds /v1/... itself)" in err


def test_base_url_leaves_other_urls_alone() -> None:
    assert base_url("http://h:8000") == "http://h:8000"
    assert base_url("http://h:8000/") == "http://h:8000"
    assert base_url("http://h:8000/v1") == "http://h:8000"
    assert base_url("http://h:8000/proxy/v1") == "http://h:8000/proxy"
    assert base_url("http://h:8000/v10") == "http://h:8000/v10"


async def test_compare_prints_side_by_side(fake_server: StartServer, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Two results side by side with a change column."""
    url, _ = await fake_server()
    for label in ("pd", "colocated"):
        assert await cli("--url", url, "--rate", "100", "-n", "5", "--label", label,
                         "--out", str(tmp_path / f"{label}.json"), *COMMON) == 0
    capsys.readouterr()
    assert await cli("compare", str(tmp_path / "pd.json"), str(tmp_path / "colocated.json")) == 0
    out = capsys.readouterr().out
    assert "pd" in out and "colocated" in out and "change" in out and "TTFT p99 ms" in out


async def test_usage_errors_exit_2(fake_server: StartServer, tmp_path: Path) -> None:
    """Bad flags, both loop kinds, no bound, bad SLO, unreachable server: exit 2."""
    url, _ = await fake_server()
    assert await cli("--url", url, "--rate", "1", "--concurrency", "2", "-n", "1") == 2
    assert await cli("--url", url, "--rate", "1") == 2
    assert await cli("--url", url, "--rate", "1", "-n", "1", "--slo", "ttft") == 2
    assert await cli("--url", url, "--rate", "-1", "-n", "1") == 2
    assert await cli("--url", "http://127.0.0.1:9", "--rate", "1", "-n", "1", *COMMON) == 2
    assert await cli("report", str(tmp_path / "missing.json")) == 2


async def test_sweep_finds_highest_passing_rate(fake_server: StartServer,
                                                tmp_path: Path) -> None:
    """Explicit rates against a server that always passes: the highest rate is reported."""
    url, _ = await fake_server()
    out = tmp_path / "sweep.json"
    rc = await cli("sweep", "--url", url, "--rates", "20,40", "--duration", "0.5",
                   "--slo", "ttft:5000", "--out", str(out), *COMMON)
    assert rc == 0
    data = orjson.loads(out.read_bytes())
    assert data["max_rate_meeting_slo"] == 40
    assert [st["rate"] for st in data["steps"]] == [20, 40]
    assert len(data["step_files"]) == 2
    assert await cli("report", str(out)) == 0
    rc = await cli("sweep", "--url", url, "--rates", "20", "--duration", "0.3",
                   "--slo", "ttft:0.0001", *COMMON)
    assert rc == 1


def test_python_dash_m_help() -> None:
    """`python -m loadgen --help` works standalone and names the subcommands."""
    proc = subprocess.run([sys.executable, "-m", "loadgen", "--help"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0
    assert "sweep" in proc.stdout and "compare" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "loadgen", "run", "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert "--burstiness" in proc.stdout and "--slo" in proc.stdout
