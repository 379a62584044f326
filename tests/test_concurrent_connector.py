"""The proxy's concurrent-connector path: both legs at once, cancellation, retries, usage."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest

import lb.connectors.registry as registry
from lb.connectors.base import (
    BackendRef,
    Dispatch,
    HandshakeMode,
    PrefillResult,
    RequestView,
    one_token_prefill_body,
    usage_of,
)
from tests.conftest import make_config
from tests.fake_vllm import FakeBehaviour, make_fake, run_app
from tests.test_proxy_edges import sse_events

_ids = itertools.count()


class TwinConnector:
    """A minimal concurrent connector: both legs carry the same fresh transfer id."""

    name = "twin"
    mode = HandshakeMode.CONCURRENT

    def __init__(self, options: Mapping[str, Any]) -> None:
        pass

    def new_dispatch(self, request: RequestView, prefill: BackendRef, decode: BackendRef | None
                     ) -> Dispatch:
        return Dispatch(request.request_id, prefill, decode, {"transfer_id": f"x{next(_ids)}"})

    def prefill_body(self, request: RequestView, dispatch: Dispatch) -> dict[str, Any]:
        return {**one_token_prefill_body(request), "transfer_id": dispatch.state["transfer_id"]}

    def accept_prefill(self, response: Mapping[str, Any], dispatch: Dispatch) -> PrefillResult:
        usage, prompt, cached = usage_of(response)
        return PrefillResult(handoff=None, usage=usage, prompt_tokens=prompt, cached_tokens=cached)

    def decode_body(self, request: RequestView, dispatch: Dispatch,
                    prefill: PrefillResult | None) -> dict[str, Any]:
        assert prefill is None
        return {**request.body, "transfer_id": dispatch.state["transfer_id"]}


@pytest.fixture(autouse=True)
def twin(monkeypatch):
    monkeypatch.setattr(registry, "BUILTINS",
                        {**registry.BUILTINS, "twin": f"{__name__}:TwinConnector"})


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def twin_config(prefill: list[str], decode: list[str], **extra: Any):
    return make_config(prefill, decode, kv_transfer={"connector": "twin"}, **extra)


async def test_both_legs_start_together_and_usage_is_stitched(start_pdlb, http):
    p, d = FakeBehaviour(delay_s=0.3), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        url, _ = await start_pdlb(twin_config([pu], [du]))
        body = {"prompt": "x", "max_tokens": 3, "stream": True,
                "stream_options": {"include_usage": True}}
        async with http.post(url + "/v1/completions", json=body) as r:
            events = sse_events(await r.read())
        assert events[-1] == "[DONE]"
        usage = events[-2]["usage"]
        assert usage["prompt_tokens_details"] == {"cached_tokens": 3}  # the prefill's figure
        # the decode did not wait for the prefill's answer, and both carried one transfer id
        assert p.requests[0]["body"]["transfer_id"] == d.requests[0]["body"]["transfer_id"]
        async with http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}) as r:
            data = await r.json()
        assert data["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
        assert p.requests[1]["body"]["transfer_id"] != p.requests[0]["body"]["transfer_id"]


async def test_failed_prefill_cancels_decode_and_retries_with_fresh_dispatch(start_pdlb, http):
    bad, good = FakeBehaviour(status=500), FakeBehaviour()
    d1, d2 = FakeBehaviour(delay_s=1.0), FakeBehaviour()
    async with run_app(make_fake("prefill", bad)) as p1, run_app(make_fake("prefill", good)) as p2, \
            run_app(make_fake("decode", d1)) as u1, run_app(make_fake("decode", d2)) as u2:
        cfg = twin_config([p1, p2], [u1, u2], pools={"prefill": {"policy": "round_robin"},
                                                      "decode": {"policy": "round_robin"}},
                          health={"interval_s": 60, "failures_to_eject": 10})
        url, _ = await start_pdlb(cfg)
        async with http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}) as r:
            assert r.status == 200
        # attempt 1: p1 failed → the decode on u1 was cancelled; attempt 2 on p2 + u2
        assert len(bad.requests) == 1 and len(good.requests) == 1 and len(d2.requests) == 1
        t1 = bad.requests[0]["body"]["transfer_id"]
        t2 = good.requests[0]["body"]["transfer_id"]
        assert t1 != t2 and d2.requests[0]["body"]["transfer_id"] == t2


async def test_client_disconnect_cancels_both_legs(start_pdlb, http):
    p, d = FakeBehaviour(delay_s=3.0), FakeBehaviour(chunk_delay_s=0.05)
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        url, app = await start_pdlb(twin_config([pu], [du]))
        r = await http.post(url + "/v1/completions",
                            json={"prompt": "x", "max_tokens": 500, "stream": True})
        await r.content.readline()
        r.close()
        for _ in range(100):
            if d.aborted:
                break
            await asyncio.sleep(0.02)
        assert d.aborted == 1
        # the prefill leg (still waiting on its slow backend) was cancelled too: counters zero


async def test_prefill_failure_after_decode_started_is_ignored(start_pdlb, http):
    """Once the decode streams, it has its KV: a late prefill error changes nothing."""
    p = FakeBehaviour(status=500, delay_s=0.2)
    d = FakeBehaviour(chunk_delay_s=0.05)
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        url, _ = await start_pdlb(twin_config([pu], [du]))
        body = {"prompt": "x", "max_tokens": 10, "stream": True,
                "stream_options": {"include_usage": True}}
        async with http.post(url + "/v1/completions", json=body) as r:
            events = sse_events(await r.read())
        assert events[-1] == "[DONE]" and len(events) == 12
        assert events[-2]["usage"]["prompt_tokens_details"] is None  # unknown: not the decode's
