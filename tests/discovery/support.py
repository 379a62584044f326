"""What the discovery tests share: emulators on distinct loopback addresses (127.0.0.2,
127.0.0.3, ... — Linux routes all of 127/8 to lo) on one port, since DNS and pod IPs give
addresses, not ports; a request flow that records every answer; bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from emulator import EmulatorConfig, EmulatorServer

MODEL = "emulated-model"


def free_port(hosts: tuple[str, ...]) -> int:
    """A TCP port free on every one of ``hosts`` (tried until one is)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind((hosts[0], 0))
            port = int(first.getsockname()[1])
            others = []
            try:
                for host in hosts[1:]:
                    s = socket.socket()
                    others.append(s)
                    s.bind((host, port))
            except OSError:
                continue
            finally:
                for s in others:
                    s.close()
            return port
    raise RuntimeError(f"no port free on all of {hosts}")


def emulator(role: str, host: str = "127.0.0.1", port: int = 0,
             **config: Any) -> EmulatorServer:
    """An emulator on ``host:port``; a prefill advertises ``host`` as its KV side channel."""
    return EmulatorServer(EmulatorConfig(role=role, time_scale=50.0, seed=7,
                                         side_channel_host=host, **config), host=host, port=port)


async def until(check: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never happened within {limit_s} s: {what}")
        await asyncio.sleep(0.02)


class Flow:
    """Requests sent back to back by ``workers`` clients until stopped; every status kept."""

    def __init__(self, http: aiohttp.ClientSession, url: str, workers: int = 2) -> None:
        self.http = http
        self.url = url
        self.workers = workers
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                async with self.http.post(self.url + "/v1/completions", json={
                        "model": MODEL, "prompt": f"flow {i} {n}", "max_tokens": 2}) as r:
                    body = await r.text()
                    self.statuses.append(r.status)
                    if r.status != 200:
                        self.failures.append(f"{r.status}: {body}")
            except aiohttp.ClientError as exc:
                self.failures.append(repr(exc))
            await asyncio.sleep(0.005)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def wait_for(self, count: int) -> None:
        """Until ``count`` more answers have come."""
        target = len(self.statuses) + count
        await until(lambda: len(self.statuses) >= target or bool(self.failures),
                    f"{count} more answers")


@contextlib.asynccontextmanager
async def flowing(http: aiohttp.ClientSession, url: str) -> AsyncIterator[Flow]:
    """A running :class:`Flow`; on exit it stops and must have had no failure."""
    flow = Flow(http, url)
    flow.start()
    try:
        yield flow
    finally:
        await flow.stop()
    assert not flow.failures, flow.failures[:5]
    assert flow.statuses and set(flow.statuses) == {200}


async def complete(http: aiohttp.ClientSession, url: str, prompt: str) -> int:
    async with http.post(url + "/v1/completions",
                         json={"model": MODEL, "prompt": prompt, "max_tokens": 2}) as r:
        await r.read()
        return r.status


def urls(app_pool: Any) -> list[str]:
    return [b.url for b in app_pool.backends]
