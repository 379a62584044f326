"""Run planned vLLM servers: spawn each in its own process group with its log file, wait
for every ``/health``, report one that exits, restart one (tests of what a restarted engine
does), and stop them all (SIGTERM to each group, SIGKILL to what is left after
``stop_timeout_s``)."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from lb.tools.launch_vllm.plan import (
    LaunchConfig,
    Role,
    ServerPlan,
    VllmLaunchError,
    find_vllm,
    plan_servers,
)


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
            return int(resp.status) == 200
    except (OSError, urllib.error.URLError):
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class _Running:
    plan: ServerPlan
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    started_at: float


@dataclass
class VllmPool:
    """Start the servers of ``config``, wait for their health, stop them all on exit.

    ``start()`` raises VllmLaunchError (after stopping whatever it started) when a server
    exits or is not healthy within ``startup_timeout_s``; ``stop()`` is idempotent.
    ``stop_event`` (set it from a signal handler) aborts a start in progress.
    """

    config: LaunchConfig
    stop_event: threading.Event = field(default_factory=threading.Event)
    servers: list[ServerPlan] = field(default_factory=list, init=False)
    run_dir: Path = field(init=False)
    _running: list[_Running] = field(default_factory=list, init=False)
    _startup_times: dict[str, float] = field(default_factory=dict, init=False)
    _base_env: dict[str, str] = field(default_factory=dict, init=False)

    @property
    def prefill_urls(self) -> list[str]:
        return [s.url for s in self.servers if s.role == "prefill"]

    @property
    def decode_urls(self) -> list[str]:
        return [s.url for s in self.servers if s.role == "decode"]

    @property
    def startup_times(self) -> dict[str, float]:
        """Seconds from spawn to the first healthy answer, per server name."""
        return dict(self._startup_times)

    def log_path(self, name: str) -> Path:
        return next(s.log_path for s in self.servers if s.name == name)

    def start(self) -> VllmPool:
        vllm = self.config.vllm or find_vllm()
        if self.config.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix="pdlb-vllm-"))
        else:
            self.run_dir = self.config.run_dir.resolve()
        self.servers = plan_servers(self.config, vllm=vllm, run_dir=self.run_dir)
        base_env = dict(os.environ)
        if self.config.device == "cpu":
            # The CPU recipe keeps vLLM's caches out of $HOME; on GPUs vLLM's default cache
            # (torch.compile artefacts) is worth keeping between runs.
            base_env.setdefault("VLLM_CACHE_ROOT", str(self.run_dir / "vllm-cache"))
        self._base_env = base_env
        try:
            for plan in self.servers:
                self._running.append(self._spawn(plan))
            self._wait_healthy(list(self._running))
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, role: Role, index: int = 0) -> float:
        """Stop one server (its whole process group, as :meth:`stop` does) and start it
        again with the same plan (ports, environment, log file appended to); wait until it
        is healthy. Returns the seconds from spawn to healthy (also in startup_times).

        A server that does not come back is stopped again and VllmLaunchError raised; the
        others keep running."""
        slot = next((k for k, r in enumerate(self._running)
                     if r.plan.role == role and r.plan.index == index), None)
        if slot is None:
            raise VllmLaunchError(f"no running {role}-{index} to restart")
        old = self._running[slot]
        _stop_all([old], self.config.stop_timeout_s)
        new = self._spawn(old.plan)  # its log gets the command line again, then the new run
        self._running[slot] = new
        try:
            self._wait_healthy([new])
        except BaseException:
            self._running.remove(new)
            _stop_all([new], self.config.stop_timeout_s)
            raise
        return self._startup_times[new.plan.name]

    def kill(self, role: Role, index: int = 0) -> None:
        """SIGKILL one server's whole process group, as a crash would (no graceful stop);
        :meth:`stop` later only reaps it."""
        running = next((r for r in self._running
                        if r.plan.role == role and r.plan.index == index), None)
        if running is None:
            raise VllmLaunchError(f"no running {role}-{index} to kill")
        _signal_group(running.proc, signal.SIGKILL)
        running.proc.wait()

    def _spawn(self, plan: ServerPlan) -> _Running:
        plan.log_path.parent.mkdir(parents=True, exist_ok=True)
        Path(plan.env["TMPDIR"]).mkdir(parents=True, exist_ok=True)
        log = plan.log_path.open("ab")
        log.write(f"$ {shlex.join(plan.argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            plan.argv,
            env={**self._base_env, **plan.env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() kills the tree
        )
        return _Running(plan, proc, log, time.monotonic())

    def _wait_healthy(self, servers: list[_Running]) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        pending = list(servers)
        while pending:
            for r in list(pending):
                if r.proc.poll() is not None:
                    raise VllmLaunchError(
                        f"{r.plan.name} exited with {r.proc.returncode} while starting; "
                        f"log {r.plan.log_path}:\n{_tail(r.plan.log_path)}"
                    )
                if _healthy(r.plan.url):
                    self._startup_times[r.plan.name] = time.monotonic() - r.started_at
                    pending.remove(r)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(r.plan.name for r in pending)
                raise VllmLaunchError(
                    f"not healthy after {self.config.startup_timeout_s:.0f} s: {names}; "
                    f"logs in {self.run_dir / 'logs'}"
                )
            if self.stop_event.wait(0.5):
                raise VllmLaunchError("stopped while waiting for the servers to start")

    def check_alive(self) -> None:
        """Raise VllmLaunchError naming the first server whose process has exited."""
        for r in self._running:
            if r.proc.poll() is not None:
                raise VllmLaunchError(
                    f"{r.plan.name} exited with {r.proc.returncode}; "
                    f"log {r.plan.log_path}:\n{_tail(r.plan.log_path)}"
                )

    def stop(self) -> None:
        """SIGTERM every server's process group, SIGKILL what is left after the timeout."""
        running, self._running = self._running, []
        _stop_all(running, self.config.stop_timeout_s)

    def __enter__(self) -> VllmPool:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _stop_all(running: list[_Running], timeout_s: float) -> None:
    """SIGTERM each server's process group, SIGKILL what is left after ``timeout_s``, close
    the logs, and wait until no process of any group is left."""
    for r in running:
        _signal_group(r.proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for r in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for r in running:
        # The API server may be gone while its engine processes linger: kill the group.
        _signal_group(r.proc, signal.SIGKILL)
        r.proc.wait()
        r.log.close()
    for r in running:
        _wait_group_gone(r.proc.pid, timeout_s=5.0)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # start_new_session=True made the child a group leader: its pid is the group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Wait until no process of the group is left (SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)
