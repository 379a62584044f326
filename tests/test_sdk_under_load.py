"""The official OpenAI SDK streaming through pdlb's default front on a busy machine: every
stream that delivered its usage and ``[DONE]`` is counted and logged as a 200, never as a
499 / ``client_disconnects_total{phase="before_response"}`` (issue 16: reported once under
load). Two CPU burners keep both cores busy while 96 streams run, 16 at a time; the SDK
closes each response as soon as it has read ``[DONE]``, the race the bug was about."""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest

from emulator import EmulatorConfig, EmulatorServer
from tests.conftest import make_config

STREAMS = 96
CONCURRENCY = 16


def _burn(until: float) -> None:
    x = 0
    while time.time() < until:
        x += 1


@pytest.fixture
def busy_machine() -> Iterator[None]:
    until = time.time() + 60
    ctx = multiprocessing.get_context("spawn")
    burners = [ctx.Process(target=_burn, args=(until,), daemon=True) for _ in range(2)]
    for b in burners:
        b.start()
    try:
        yield
    finally:
        for b in burners:
            b.terminate()
            b.join(5)


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


@pytest.mark.slow
async def test_sdk_streams_on_a_busy_machine_are_200s(start_pdlb: Any, busy_machine: None
                                                      ) -> None:
    config = dict(time_scale=100.0, seed=3)
    async with EmulatorServer(EmulatorConfig(role="prefill", **config)) as p, \
            EmulatorServer(EmulatorConfig(role="decode", **config)) as d:
        url, _ = await start_pdlb(make_config([p.url], [d.url]))
        sem = asyncio.Semaphore(CONCURRENCY)
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0,
                                      timeout=60) as client:
            async def one(i: int) -> int:
                async with sem:
                    stream = await client.chat.completions.create(
                        model="emulated-model", max_tokens=8 + i % 24, stream=True,
                        messages=[{"role": "user", "content": f"question {i} " * (1 + i % 7)}],
                        stream_options={"include_usage": True})
                    usage = None
                    async for chunk in stream:
                        usage = chunk.usage or usage
                    assert usage is not None
                    return usage.completion_tokens

            got = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(STREAMS))), 120)
        assert got == [8 + i % 24 for i in range(STREAMS)]
        await asyncio.sleep(0.3)  # the last handlers log and count after the client closed
        async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
            text = await r.text()
    assert _sample(text, "pdlb_requests_total", endpoint="chat", status="200") == STREAMS
    assert _sample(text, "pdlb_requests_total", status="499") == 0
    assert _sample(text, "pdlb_client_disconnects_total", phase="before_response") == 0
