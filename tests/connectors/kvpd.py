"""Helpers for the connector tests: emulated PD pairs per connector, and what to read back.

Every test starts real emulator servers (in this process, ports 0) in the connector mode
under test and a real pdlb in front of them through the ``start_pdlb`` fixture (which also
checks that pdlb's in-flight counters are back to zero afterwards).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from emulator import EmulatorConfig, EmulatorServer
from emulator.app import state_of
from lb.config import Config
from tests.conftest import make_config

CONCURRENT = ("nixl_push", "mooncake", "sglang")
ALL = ("nixl", "nixl_push", "mooncake", "p2p_nccl", "sglang", "shared_storage", "lmcache")

MODEL = "emulated-model"


def emulator_mode(connector: str) -> str:
    return "shared_storage" if connector == "lmcache" else connector


def kv_transfer(connector: str, prefills: Sequence[EmulatorServer],
                decodes: Sequence[EmulatorServer], **options: Any) -> dict[str, Any]:
    """The [kv_transfer] table that points ``connector`` at these emulators."""
    backends: dict[str, dict[str, Any]] = {}
    if connector == "nixl_push":
        backends = {p.url: {"engine_id": p.engine.engine_id, "side_channel_port": p.port}
                    for p in prefills}
    elif connector in ("mooncake", "sglang"):  # the emulator is its own bootstrap server
        backends = {p.url: {"bootstrap_port": p.port} for p in prefills}
    elif connector == "p2p_nccl":
        backends = {s.url: {"zmq_address": f"127.0.0.1:{s.port}"}
                    for s in (*prefills, *decodes)}
    table: dict[str, Any] = {"connector": connector, **options}
    if backends:
        table["backends"] = {**backends, **table.get("backends", {})}
    return table


@dataclass
class PD:
    """pdlb in front of emulated prefills and decodes."""

    url: str
    prefills: list[EmulatorServer]
    decodes: list[EmulatorServer]
    app: Any

    @property
    def p(self) -> EmulatorServer:
        return self.prefills[0]

    @property
    def d(self) -> EmulatorServer:
        return self.decodes[0]


@contextlib.asynccontextmanager
async def emulators(connector: str, n_prefill: int, n_decode: int,
                    prefill: dict[str, Any] | None = None, decode: dict[str, Any] | None = None,
                    **common: Any) -> AsyncIterator[tuple[list[EmulatorServer],
                                                          list[EmulatorServer]]]:
    base = {"time_scale": 20.0, "seed": 7, "kv_connector": emulator_mode(connector), **common}
    async with contextlib.AsyncExitStack() as stack:
        ps = [await stack.enter_async_context(EmulatorServer(
            EmulatorConfig(role="prefill", **{**base, **(prefill or {})})))
            for _ in range(n_prefill)]
        ds = [await stack.enter_async_context(EmulatorServer(
            EmulatorConfig(role="decode", **{**base, **(decode or {})})))
            for _ in range(n_decode)]
        yield ps, ds


def pd_config(connector: str, prefills: Sequence[EmulatorServer],
              decodes: Sequence[EmulatorServer], kv_options: dict[str, Any] | None = None,
              **extra: Any) -> Config:
    extra.setdefault("health", {"interval_s": 30, "timeout_s": 1.0, "failures_to_eject": 100})
    return make_config([p.url for p in prefills], [d.url for d in decodes],
                       kv_transfer=kv_transfer(connector, prefills, decodes,
                                               **(kv_options or {})), **extra)


def state(server: EmulatorServer) -> dict[str, Any]:
    return state_of(server.app)


def legs(server: EmulatorServer) -> list[dict[str, Any]]:
    """The completion requests a server received: {"path", "headers", "body"}."""
    return [r for r in state(server)["recent_requests"] if r["path"].startswith("/v1/")]


def tokens_by_source(server: EmulatorServer) -> dict[str, float]:
    """vllm:prompt_tokens_by_source_total per source, from the server's /metrics."""
    text = server.engine.metrics.render().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r'vllm:prompt_tokens_by_source_total\{[^}]*source="(\w+)"[^}]*\} (\S+)',
                         text):
        out[m.group(1)] = float(m.group(2))
    return out


async def eventually(check: Callable[[], bool], limit_s: float = 5.0) -> None:
    """Wait until ``check()`` holds (emulators and pdlb finish asynchronously)."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def idle(server: EmulatorServer) -> bool:
    s = state(server)
    return s["running"] == 0 and s["waiting"] == 0 and s["kv_awaiting"] == 0
