"""Running the app on a socket: uvloop, handler cancellation, signals, graceful drain.

``handler_cancellation=True`` makes aiohttp cancel a handler when its client disconnects —
that is what lets pdlb abort the upstream legs at once instead of finishing a stream nobody
reads (and holding the prefill's KV meanwhile).

Signals: SIGTERM/SIGINT stop accepting connections, let in-flight requests finish for up to
``[server] drain_timeout_s``, then exit. SIGHUP reloads the config file (see lb/serve/admin.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from lb.config import Config
from lb.errors import ConfigError
from lb.serve.admin import Reloader
from lb.serve.app import (
    ADMIN_APP,
    DRAINING,
    GUARD,
    METRICS,
    POOLS,
    RELOAD,
    SIBLINGS,
    create_app,
    own_metrics,
)
from lb.serve.front import Front, FrontSite
from lb.serve.workers import Siblings

log = logging.getLogger("pdlb.server")


async def start_site(
    config: Config, *, drain_s: float | None = None, reloader: Reloader | None = None,
    reuse_port: bool = False,
) -> tuple[web.AppRunner, str]:
    """Start pdlb on config.server.host:port; returns the runner and the bound base URL."""
    app = create_app(config, reloader)
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None,
        shutdown_timeout=config.server.drain_timeout_s if drain_s is None else drain_s,
        max_field_size=16384, max_line_size=16384,
        keepalive_timeout=config.server.client_idle_timeout_s,
        # Request bodies stay as sent: the guard refuses a Content-Encoding (415) before
        # anything is read, so nothing is ever decompressed (no decompression bombs).
        auto_decompress=False,
    )
    # Side servers (admin on its own port, a worker's private metrics port) are closed with
    # the app; the hook is added now: the app's signals are frozen once it starts.
    extra: list[web.AppRunner] = []

    async def close_extra(_: web.Application) -> None:
        for side in extra:
            await side.cleanup()

    app.on_cleanup.append(close_extra)
    siblings = Siblings.from_env()
    if siblings is not None:
        app[SIBLINGS] = siblings
    await runner.setup()
    try:
        return await _start_sites(runner, config, drain_s, reuse_port, extra)
    except BaseException:
        await runner.cleanup()  # the app's resources (client session, tasks) go too
        raise


async def _start_sites(runner: web.AppRunner, config: Config, drain_s: float | None,
                       reuse_port: bool, extra: list[web.AppRunner]
                       ) -> tuple[web.AppRunner, str]:
    app = runner.app
    site: web.BaseSite
    if config.server.fast_front:
        assert runner.server is not None
        front = Front(config, app[GUARD], runner.server)
        site = FrontSite(runner, front, config.server.host, config.server.port, backlog=4096,
                         reuse_port=reuse_port or None,
                         drain_s=config.server.drain_timeout_s if drain_s is None else drain_s)
    else:
        site = web.TCPSite(runner, config.server.host, config.server.port, backlog=4096,
                           reuse_port=reuse_port or None)
    await site.start()
    host, port = runner.addresses[0][:2]
    siblings = app.get(SIBLINGS)
    if siblings is not None:  # --workers N: this worker's metrics for its siblings' scrapes
        private = web.Application()
        private[METRICS] = app[METRICS]
        private.router.add_get("/metrics", own_metrics)
        private_runner = web.AppRunner(private, access_log=None)
        await private_runner.setup()
        extra.append(private_runner)
        await web.TCPSite(private_runner, "127.0.0.1", 0).start()
        siblings.announce(_url(*private_runner.addresses[0][:2]) + "/metrics")
    admin_app = app.get(ADMIN_APP)
    if admin_app is not None:
        admin_runner = web.AppRunner(admin_app, access_log=None, auto_decompress=False)
        await admin_runner.setup()
        extra.append(admin_runner)
        admin_site = web.TCPSite(admin_runner, config.admin.host or config.server.host,
                                 config.admin.port or 0)
        await admin_site.start()
        log.info("admin API on http://%s:%s", *admin_runner.addresses[0][:2])
    return runner, _url(host, port)


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in str(host) else host
    return f"http://{shown}:{port}"


async def serve(config: Config, reloader: Reloader | None = None,
                reuse_port: bool = False) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    runner, url = await start_site(config, reloader=reloader, reuse_port=reuse_port)

    def on_sighup() -> None:
        try:
            runner.app[RELOAD]()
        except ConfigError as exc:
            log.error("reload refused, nothing changed: %s", exc)

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    print(f"pdlb listening on {url}", flush=True)
    for name, pool in runner.app[POOLS].items():
        usable = sum(1 for b in pool.backends if b.healthy)
        log.info("%s pool: %d of %d backend(s) usable now (%s), policy %s", name, usable,
                 len(pool.backends), ", ".join(b.url for b in pool.backends),
                 pool.config.policy)
    log.info("access log %s", f"on ({config.log.format})" if config.log.access else "off")
    try:
        await stop.wait()
    finally:
        runner.app[DRAINING].set()
        log.info("shutting down: draining in-flight requests (up to %g s)",
                 config.server.drain_timeout_s)
        await runner.cleanup()


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run
    return uvloop.run


def run(config: Config, reloader: Reloader | None = None, reuse_port: bool = False) -> int:
    try:
        _event_loop_runner()(serve(config, reloader, reuse_port))
    except ConfigError as exc:  # a start-up check that needs the network (connectors)
        print(f"pdlb: config error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pdlb: cannot listen on {config.server.host}:{config.server.port}: "
              f"{listen_error(exc)}", file=sys.stderr)
        return 2
    return 0


def listen_error(exc: OSError) -> str:
    """A bind failure in a few words ("address already in use"), without the event loop's
    wrapping of it."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host: {exc.strerror}"
    if exc.errno == errno.EADDRINUSE:
        return "the address is already in use (another server on that port?)"
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    return str(exc)
