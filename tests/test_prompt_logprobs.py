"""Requests that ask vLLM for prompt logprobs, or for beam search, skip the prefill leg
(lb/request.py, ``reads_no_pulled_kv``): vLLM's decode reads no pulled KV for them and
computes the whole prompt itself (tests/vllm/test_vllm_features.py shows it on real vLLM), so a prefill leg
would only cost a prefill backend a forward pass and hold KV blocks nobody reads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from emulator import EmulatorConfig, EmulatorServer
from emulator.app import state_of
from lb.request import reads_no_pulled_kv, wants_prompt_logprobs
from tests.conftest import make_config


@pytest.mark.parametrize("endpoint,body,wanted", [
    ("completions", {"prompt_logprobs": 0}, True),
    ("completions", {"prompt_logprobs": None}, False),
    ("completions", {"echo": True}, False),
    ("completions", {"echo": True, "logprobs": 0}, True),
    ("completions", {"echo": False, "logprobs": 2}, False),
    ("completions", {"logprobs": 2}, False),
    ("chat", {"prompt_logprobs": 1}, True),
    ("chat", {"echo": True}, True),  # vLLM's top_logprobs defaults to 0, not None
    ("chat", {"echo": True, "top_logprobs": None}, True),  # and a null becomes 0
    ("chat", {"echo": False}, False),
    ("chat", {"echo": True, "top_logprobs": 2}, True),
    ("chat", {"logprobs": True, "top_logprobs": 2}, False),
    ("chat", {}, False),
])
def test_which_requests_want_prompt_logprobs(endpoint, body, wanted):
    assert wants_prompt_logprobs(body, endpoint) is wanted


def test_beam_search_reads_no_pulled_kv():
    assert reads_no_pulled_kv({"use_beam_search": True}, "completions")
    assert reads_no_pulled_kv({"use_beam_search": True}, "chat")
    assert not reads_no_pulled_kv({"use_beam_search": False}, "chat")
    assert reads_no_pulled_kv({"prompt_logprobs": 1}, "chat")
    assert not reads_no_pulled_kv({"logprobs": 1}, "completions")


@pytest.fixture
async def pd(start_pdlb) -> AsyncIterator[tuple[str, EmulatorServer, EmulatorServer]]:
    async with EmulatorServer(EmulatorConfig(role="prefill", time_scale=20.0)) as p, \
            EmulatorServer(EmulatorConfig(role="decode", time_scale=20.0)) as d:
        url, _ = await start_pdlb(make_config([p.url], [d.url]))
        yield url, p, d


def paths(server: EmulatorServer) -> list[str]:
    return [r["path"] for r in state_of(server.app)["recent_requests"]]


async def post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as r:
        return r.status, await r.json()


async def test_prompt_logprobs_go_to_the_decode_alone(pd):
    url, p, d = pd
    base = {"model": "emulated-model", "max_tokens": 4}
    status, _ = await post(url + "/v1/completions", {**base, "prompt": "hi " * 50,
                                                     "prompt_logprobs": 1})
    assert status == 200
    status, _ = await post(url + "/v1/chat/completions", {
        **base, "messages": [{"role": "user", "content": "hi"}], "echo": True})
    assert status == 200
    assert paths(p) == [] and paths(d) == ["/v1/completions", "/v1/chat/completions"]
    # The decode got the client's body untouched: no kv_transfer_params to pull.
    assert state_of(d.app)["kv_pulled"] == 0
    # An ordinary request still goes through both.
    status, _ = await post(url + "/v1/completions", {**base, "prompt": "hi", "echo": True})
    assert status == 200 and paths(p) == ["/v1/completions"]
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
        assert "pdlb_direct_decode_total 2.0" in await r.text()
