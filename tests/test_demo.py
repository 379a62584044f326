"""`pdlb demo`, the README's first command, end to end (shortened): real processes — the
emulators, pdlb through its front, the load generator — and the side-by-side table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_runs_both_sides_and_prints_the_table(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lb.cli", "demo", "--duration", "2", "--rate", "3", "--quiet",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for row in ("TTFT p50 ms", "ITL p99 ms", "goodput req/s", "SLO attainment %"):
        assert row in out.stdout
    for side in ("pd", "colocated"):
        summary = json.loads((tmp_path / f"{side}.json").read_text())["summary"]
        assert summary["completed"] > 0 and summary["failed"] == 0, (side, summary)
        assert summary["total_output_tokens"] > 0
    assert "pdlb demo: done" in out.stdout + out.stderr
