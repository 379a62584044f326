"""Every built-in connector through pdlb on the emulator: the KV moves, nothing recomputes,
and the text is what a colocated server says."""

from __future__ import annotations

import openai
import pytest

from emulator import EmulatorConfig, EmulatorServer
from tests.connectors.kvpd import ALL, MODEL, eventually, state, tokens_by_source

PROMPT = "The quick brown fox jumps over the lazy dog. " * 12


@pytest.mark.parametrize("connector", ALL)
async def test_completions_chat_and_stream_move_the_kv(make_pd, connector):
    """Three requests (completion, chat, stream with usage): three transfers, no recompute,
    prompt tokens counted as external_kv_transfer on the decode and never computed there."""
    async with make_pd(connector) as pd, openai.AsyncOpenAI(
            base_url=pd.url + "/v1", api_key="x", max_retries=0) as client:
        r = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6)
        assert r.usage is not None and r.usage.completion_tokens == 6
        chat = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=4)
        assert chat.choices[0].message.content
        stream = await client.completions.create(
            model=MODEL, prompt=PROMPT + "again", max_tokens=5, stream=True,
            stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage or usage
        assert text and usage is not None and usage.completion_tokens == 5
        ds, ps = state(pd.d), state(pd.p)
        assert ds["kv_pulled"] == 3 and ds["kv_recomputed"] == 0, ds["kv_recomputed_by_reason"]
        by_source = tokens_by_source(pd.d)
        assert by_source.get("external_kv_transfer", 0) > 200  # the rest: decode cache hits
        assert by_source.get("local_compute", 0) == 0
        assert ps["requests_finished"] == 3
        await eventually(lambda: state(pd.p)["kv_held"] == 0)


@pytest.mark.parametrize("connector", ALL)
async def test_same_text_as_a_colocated_server(make_pd, http, connector):
    """PD through pdlb with any connector yields what one colocated server says."""
    body = {"model": MODEL, "prompt": "hello there " * 10, "max_tokens": 12}
    async with make_pd(connector) as pd, EmulatorServer(
            EmulatorConfig(role="both", time_scale=20.0, seed=7)) as both:
        async with http.post(pd.url + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            via_pdlb = (await r.json())["choices"][0]["text"]
        async with http.post(both.url + "/v1/completions", json=body) as r:
            direct = (await r.json())["choices"][0]["text"]
        assert via_pdlb == direct
        assert state(pd.d)["kv_pulled"] == 1
