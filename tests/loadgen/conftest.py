"""Fixtures: the fake streaming server on a real loopback socket (port 0)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from loadgen.testing import FakeServerOptions, make_app

StartServer = Callable[..., Awaitable[tuple[str, web.Application]]]


@pytest.fixture
async def fake_server() -> AsyncIterator[StartServer]:
    """Start fake servers with given options; returns (base URL, app). Closed after."""
    runners: list[web.AppRunner] = []

    async def start(**options: object) -> tuple[str, web.Application]:
        app = make_app(FakeServerOptions(**options))  # type: ignore[arg-type]
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}", app

    yield start
    for r in runners:
        await r.cleanup()
