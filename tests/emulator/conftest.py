"""Fixtures for the emulator's own tests: servers on port 0, one HTTP session, helpers."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from emulator import EmulatorConfig, EmulatorServer

StartEmulator = Callable[..., Awaitable[EmulatorServer]]


@pytest.fixture
async def emulator() -> AsyncIterator[StartEmulator]:
    """Start EmulatorServers (time_scale 20 unless given); all stopped after the test."""
    servers: list[EmulatorServer] = []

    async def start(**overrides: Any) -> EmulatorServer:
        config = EmulatorConfig(**{"time_scale": 20.0, **overrides})
        server = await EmulatorServer(config).start()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(url, json=body) as resp:
        raw = await resp.read()
        return resp.status, orjson.loads(raw) if raw else None


async def state(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with http.get(base + "/_emulator/state") as resp:
        data: dict[str, Any] = await resp.json()
        return data


async def sse(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[bytes, list[Any]]:
    """POST a streamed request; the raw body and the decoded data events (without [DONE])."""
    async with http.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        raw = await resp.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b"", "the stream must end with a blank line"
    data = []
    for event in events[:-1]:
        assert event.startswith(b"data: "), event
        if event != b"data: [DONE]":
            data.append(orjson.loads(event[6:]))
    return raw, data


async def metric(http: aiohttp.ClientSession, base: str, name: str, **labels: str) -> float:
    """One sample of /metrics (labels other than the given ones are ignored)."""
    async with http.get(base + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


def shape(value: Any) -> Any:
    """A JSON value's structure: key order, nesting, and which leaves are null/str/int..."""
    if isinstance(value, dict):
        return [(k, shape(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__
