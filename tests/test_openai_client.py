"""The official openai client talks to pdlb as to any OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from tests.conftest import make_config
from tests.fake_vllm import FakeBehaviour, make_fake, run_app


@pytest.fixture
async def client(start_pdlb) -> AsyncIterator[openai.AsyncOpenAI]:
    p, d = FakeBehaviour(), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        url, _ = await start_pdlb(make_config([pu], [du]))
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as c:
            yield c


async def test_openai_completions(client):
    r = await client.completions.create(model="fake", prompt="hi", max_tokens=3)
    assert r.choices[0].text == "t0 t1 t2"
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens == 3


async def test_openai_chat_stream_with_usage(client):
    stream = await client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True})
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "t0 t1 t2 t3 "
    assert usage is not None and usage.completion_tokens == 4
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 3


async def test_openai_models_and_errors(client):
    models = await client.models.list()
    assert [m.id for m in models.data] == ["fake"]
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model="fake", prompt="x", max_tokens=0)
    assert "max_tokens" in str(info.value)
