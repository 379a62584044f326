"""EmulatorCluster: several emulated vLLM servers at once, for benchmarks and the demo.

    async with EmulatorCluster(prefill=2, decode=2, time_scale=10) as c:
        c.prefill_urls, c.decode_urls, c.both_urls

``mode="inprocess"`` runs them in the caller's event loop (cheap, inspectable through
``c.servers``); ``mode="subprocess"`` starts one ``python -m emulator`` process each, so a
benchmark's proxy does not share its event loop (or its core) with the emulators.
Keyword overrides are EmulatorConfig fields applied to every server; the role is set per
server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from types import TracebackType
from typing import Any, Literal

from emulator.cli import config_to_argv
from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer

Mode = Literal["inprocess", "subprocess"]
_LISTENING = "emulator listening on "


class ClusterError(RuntimeError):
    """An emulator of the cluster did not start."""


class EmulatorCluster:
    def __init__(
        self,
        prefill: int = 0,
        decode: int = 0,
        both: int = 0,
        *,
        mode: Mode = "inprocess",
        host: str = "127.0.0.1",
        config: EmulatorConfig | None = None,
        startup_timeout_s: float = 30.0,
        **overrides: Any,
    ) -> None:
        if mode not in ("inprocess", "subprocess"):
            raise ValueError(f"EmulatorCluster mode={mode!r}: must be inprocess or subprocess")
        if min(prefill, decode, both) < 0 or prefill + decode + both == 0:
            raise ValueError("EmulatorCluster needs at least one server and no negative counts")
        base = config or EmulatorConfig()
        if overrides:
            base = base.replace(**overrides)
        self.mode = mode
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self.configs: list[EmulatorConfig] = (
            [base.replace(role="prefill")] * prefill
            + [base.replace(role="decode")] * decode
            + [base.replace(role="both")] * both
        )
        self.servers: list[EmulatorServer] = []
        self.processes: list[asyncio.subprocess.Process] = []
        self.urls: list[str] = []

    def _urls(self, role: str) -> list[str]:
        return [u for u, c in zip(self.urls, self.configs, strict=False) if c.role == role]

    @property
    def prefill_urls(self) -> list[str]:
        return self._urls("prefill")

    @property
    def decode_urls(self) -> list[str]:
        return self._urls("decode")

    @property
    def both_urls(self) -> list[str]:
        return self._urls("both")

    async def start(self) -> EmulatorCluster:
        try:
            if self.mode == "inprocess":
                for config in self.configs:
                    server = await EmulatorServer(config, self.host, 0).start()
                    self.servers.append(server)
                    self.urls.append(server.url)
            else:  # processes start in parallel (each imports tiktoken & co.)
                self.urls = list(await asyncio.gather(*(self._spawn(c) for c in self.configs)))
        except BaseException:
            await self.stop()
            raise
        return self

    async def _spawn(self, config: EmulatorConfig) -> str:
        argv = [sys.executable, "-m", "emulator", "--host", self.host, "--port", "0",
                "--role", config.role, *config_to_argv(config.replace(role="both"))]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL, env=env
        )
        self.processes.append(proc)
        if proc.stdout is None:
            raise ClusterError("no stdout pipe to the emulator process")
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), self.startup_timeout_s)
        except TimeoutError:
            raise ClusterError(
                f"emulator ({' '.join(argv[3:])}) did not start in {self.startup_timeout_s} s"
            ) from None
        text = line.decode().strip()
        if not text.startswith(_LISTENING):
            raise ClusterError(
                f"emulator ({' '.join(argv[3:])}) exited with {await proc.wait()} "
                f"before listening; it said {text!r}"
            )
        return text[len(_LISTENING):]

    async def stop(self) -> None:
        servers, self.servers = self.servers, []
        for server in servers:
            await server.stop()
        processes, self.processes = self.processes, []
        for proc in processes:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in processes:
            try:
                await asyncio.wait_for(proc.wait(), 10.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self.urls = []

    async def __aenter__(self) -> EmulatorCluster:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
