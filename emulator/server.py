"""EmulatorServer: an emulated vLLM server on a real socket, as an async context manager.

    async with EmulatorServer(EmulatorConfig(role="prefill", time_scale=20)) as server:
        server.url          # "http://127.0.0.1:43123"
        server.engine       # the Engine (counters, queues, holds) for assertions

Several can run in one event loop (a pytest-asyncio test, a benchmark driver).
"""

from __future__ import annotations

import socket
from types import TracebackType

from aiohttp import web

from emulator.app import ENGINE, create_app, state_of
from emulator.config import EmulatorConfig
from emulator.engine import Engine


class EmulatorServer:
    """Serve ``create_app(config)`` on ``host:port`` (port 0 = an ephemeral port)."""

    def __init__(self, config: EmulatorConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config
        self.host = host
        self._requested_port = port
        self.app = create_app(config)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    async def start(self) -> EmulatorServer:
        if self._runner is not None:
            raise RuntimeError("EmulatorServer already started")
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server  # aiohttp keeps the bound sockets here
        sockets = getattr(server, "sockets", None) or []
        ports = [s.getsockname()[1] for s in sockets if s.family in (socket.AF_INET,
                                                                       socket.AF_INET6)]
        self._port = ports[0] if ports else self._requested_port
        engine = self.engine
        if engine.advertised_port is None:
            engine.advertised_port = self._port
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> EmulatorServer:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("EmulatorServer is not started")
        return self._port

    @property
    def url(self) -> str:
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        elif host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    @property
    def engine(self) -> Engine:
        return self.app[ENGINE]

    def state(self) -> dict[str, object]:
        """The same dict GET /_emulator/state answers."""
        return state_of(self.app)
