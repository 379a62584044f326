"""pdlb in front of emulated vLLM prefill/decode servers: the whole PD path, for real."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from emulator import EmulatorConfig, EmulatorServer
from emulator.app import state_of
from tests.conftest import make_config


@pytest.fixture
async def pd(start_pdlb) -> AsyncIterator[tuple[str, EmulatorServer, EmulatorServer]]:
    cfg = dict(time_scale=20.0, seed=7)
    async with EmulatorServer(EmulatorConfig(role="prefill", **cfg)) as p, \
            EmulatorServer(EmulatorConfig(role="decode", **cfg)) as d:
        url, _ = await start_pdlb(make_config([p.url], [d.url]))
        yield url, p, d


def state(server: EmulatorServer) -> dict[str, Any]:
    return state_of(server.app)


async def test_completions_and_chat_through_pdlb_move_the_kv(pd):
    """Every request's KV is pulled from the prefill; nothing is recomputed on decode."""
    url, p, d = pd
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        prompt = "The quick brown fox jumps over the lazy dog. " * 20
        r = await client.completions.create(model="emulated-model", prompt=prompt, max_tokens=8)
        assert r.usage is not None and r.usage.completion_tokens == 8
        assert r.choices[0].text
        chat = await client.chat.completions.create(
            model="emulated-model", messages=[{"role": "user", "content": prompt}], max_tokens=5)
        assert chat.choices[0].message.content
        stream = await client.completions.create(
            model="emulated-model", prompt=prompt, max_tokens=6, stream=True,
            stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            usage = chunk.usage or usage
        assert text and usage is not None and usage.completion_tokens == 6
    ds = state(d)
    assert ds["kv_pulled"] == 3 and ds["kv_recomputed"] == 0
    assert state(p)["kv_held"] == 0


async def test_same_text_as_a_colocated_server(pd):
    """PD through pdlb yields exactly what one colocated server would (deterministic text)."""
    url, p, d = pd
    body = {"model": "emulated-model", "prompt": "hello there " * 10, "max_tokens": 12}
    async with EmulatorServer(EmulatorConfig(role="both", time_scale=20.0, seed=7)) as both, \
            aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/completions", json=body) as r:
            via_pdlb = (await r.json())["choices"][0]["text"]
        async with http.post(both.url + "/v1/completions", json=body) as r:
            direct = (await r.json())["choices"][0]["text"]
    assert via_pdlb == direct


async def test_repeated_prompt_reports_prefill_cached_tokens(pd):
    url, p, d = pd
    prompt = "A long shared system prompt that the prefix cache should keep. " * 30
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        first = await client.completions.create(model="emulated-model", prompt=prompt, max_tokens=2)
        second = await client.completions.create(model="emulated-model", prompt=prompt, max_tokens=2)
    details = second.usage.prompt_tokens_details if second.usage else None
    assert details is not None and details.cached_tokens and details.cached_tokens > 100
    first_cached = (first.usage.prompt_tokens_details.cached_tokens
                    if first.usage and first.usage.prompt_tokens_details else 0)
    assert not first_cached


async def test_sixty_four_concurrent_requests(pd):
    url, p, d = pd
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        async def one(i: int) -> int:
            stream = await client.completions.create(
                model="emulated-model", prompt=f"request {i} " * 30, max_tokens=16, stream=True)
            n = 0
            async for chunk in stream:
                n += len(chunk.choices)
            return n

        counts = await asyncio.gather(*(one(i) for i in range(64)))
    assert counts == [16] * 64
    assert state(d)["kv_pulled"] == 64 and state(d)["kv_recomputed"] == 0


async def test_client_disconnect_frees_both_servers(pd):
    url, p, d = pd
    async with aiohttp.ClientSession() as http:
        r = await http.post(url + "/v1/completions", json={
            "model": "emulated-model", "prompt": "x " * 50, "max_tokens": 2000, "stream": True})
        await r.content.readline()
        r.close()
    for _ in range(100):
        if state(d)["running"] == 0 and state(d)["requests_aborted"] == 1:
            break
        await asyncio.sleep(0.05)
    assert state(d)["running"] == 0 and state(d)["requests_aborted"] == 1
    assert state(p)["running"] == 0 and state(p)["kv_held"] == 0


async def test_prefill_omitting_params_never_reaches_decode(pd):
    url, p, d = pd
    async with aiohttp.ClientSession() as http:
        async with http.post(p.url + "/_emulator/faults", json={"omit_kv_params": True}) as r:
            assert r.status == 200
        async with http.post(url + "/v1/completions",
                             json={"model": "emulated-model", "prompt": "x", "max_tokens": 3}) as r:
            assert r.status == 502
            assert (await r.json())["error"]["code"] == "missing_kv_transfer_params"
    assert state(d)["requests_total"] == 0
