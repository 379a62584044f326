"""Fixtures of the connector tests (helpers live in tests/connectors/kvpd.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from tests.connectors.kvpd import PD, emulator_mode, emulators, pd_config


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def make_pd(start_pdlb: Callable[..., Any], tmp_path: Any) -> Callable[..., Any]:
    """``async with make_pd("mooncake", prefill={...}, kv_options={...}) as pd:`` — emulated
    prefills/decodes in that connector's mode with pdlb in front (``pdlb`` = extra config
    tables such as resilience)."""

    @contextlib.asynccontextmanager
    async def make(connector: str, n_prefill: int = 1, n_decode: int = 1, *,
                   prefill: dict[str, Any] | None = None, decode: dict[str, Any] | None = None,
                   kv_options: dict[str, Any] | None = None, pdlb: dict[str, Any] | None = None,
                   **common: Any) -> AsyncIterator[PD]:
        if emulator_mode(connector) == "shared_storage":
            common.setdefault("shared_storage_path", str(tmp_path / "kv-store"))
        async with emulators(connector, n_prefill, n_decode, prefill, decode, **common) as (
                ps, ds):
            url, app = await start_pdlb(pd_config(connector, ps, ds, kv_options,
                                                  **(pdlb or {})))
            yield PD(url, ps, ds, app)

    return make
