"""A real ``redis-server`` on a free loopback port, for the [cluster] tests.

Missing binary: the tests skip, or fail under ``PDLB_REQUIRE_REDIS=1`` (CI; scripts/test
installs Debian's redis-server when it may)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if found is None:
        if os.environ.get("PDLB_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server missing and PDLB_REQUIRE_REDIS=1"
                        " (apt-get install redis-server)")
        pytest.skip("redis-server missing (apt-get install redis-server; scripts/test does)")
    return found


class RedisServer:
    """One redis-server process; :meth:`stop` and :meth:`start` again keep the port (an
    outage and a return), with no persistence: a restarted Redis is empty."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        self.extra = list(extra)
        self.binary = redis_binary()
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no",
             *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
