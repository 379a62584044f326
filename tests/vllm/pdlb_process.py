"""pdlb as a real subprocess in front of the real-vLLM pairs (conftest's ``pdlb_url`` and the
modules that configure their own pdlb share it)."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PIDS: dict[str, int] = {}
"""The process id of each running pdlb, by its URL (for a py-spy dump when one stalls)."""


@contextlib.contextmanager
def running_pdlb(config: Path, log_path: Path, *args: str) -> Iterator[str]:
    """``pdlb serve --config CONFIG --port 0 ARGS`` as a real subprocess logging to
    ``log_path``: yields its URL, stops it (SIGTERM, then SIGKILL after 15 s) on exit."""
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lb.cli", "serve", "--config", str(config), "--port", "0",
         *args],
        stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
    )
    match: re.Match[str] | None = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"pdlb listening on (http://\S+)", line)
        if not match:
            proc.kill()
            log.flush()
            pytest.fail(f"pdlb did not start: {line!r}\n{log_path.read_text()}", pytrace=False)
        PIDS[match.group(1)] = proc.pid
        yield match.group(1)
    finally:
        PIDS.pop(match.group(1) if match else "", None)
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        log.close()
