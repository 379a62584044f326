"""Running the app on a socket: uvloop, handler cancellation, signals, graceful drain.

``handler_cancellation=True`` makes aiohttp cancel a handler when its client disconnects —
that is what lets pdlb abort the upstream legs at once instead of finishing a stream nobody
reads (and holding the prefill's KV meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from lb.app import create_app
from lb.config import Config

log = logging.getLogger("pdlb.server")


async def start_site(config: Config, *, drain_s: float = 30.0) -> tuple[web.AppRunner, str]:
    """Start pdlb on config.server.host:port; returns the runner and the bound base URL."""
    app = create_app(config)
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=drain_s
    )
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port, backlog=4096)
    await site.start()
    host, port = runner.addresses[0][:2]
    shown = f"[{host}]" if ":" in str(host) else host
    return runner, f"http://{shown}:{port}"


async def serve(config: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    runner, url = await start_site(config)
    print(f"pdlb listening on {url}", flush=True)
    log.info("prefill: %s", ", ".join(b.url for b in config.prefill.backends))
    log.info("decode: %s", ", ".join(b.url for b in config.decode.backends))
    try:
        await stop.wait()
    finally:
        log.info("shutting down: draining in-flight requests")
        await runner.cleanup()


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run
    return uvloop.run


def run(config: Config) -> int:
    try:
        _event_loop_runner()(serve(config))
    except OSError as exc:
        print(f"pdlb: cannot listen on {config.server.host}:{config.server.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    return 0
