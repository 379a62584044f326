"""The proxy against a scriptable fake backend: protocol details and every bad path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import make_config
from tests.fake_vllm import FakeBehaviour, make_fake, run_app


@pytest.fixture
async def pair() -> AsyncIterator[tuple[FakeBehaviour, FakeBehaviour, str, str]]:
    p, d = FakeBehaviour(), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        yield p, d, pu, du


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sse_events(raw: bytes) -> list[Any]:
    events = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        if block.startswith(b"data: "):
            data = block[6:]
            events.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return events


async def test_non_stream_two_legs_and_usage(pair, start_pdlb, http):
    """Prefill gets a one-token non-streamed leg with the NIXL template; decode gets the
    client body plus the returned params; usage shows the prefill's cached tokens."""
    p, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    body = {"model": "fake", "prompt": "hello world", "max_tokens": 5, "min_tokens": 2,
            "stop": ["x"]}
    async with http.post(url + "/v1/completions", json=body,
                         headers={"X-Request-Id": "abc-123", "Authorization": "Bearer k"}) as r:
        assert r.status == 200
        assert r.headers["X-Request-Id"] == "abc-123"
        data = await r.json()
    assert data["choices"][0]["text"] == "t0 t1 t2 t3 t4"
    assert data["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
                             "prompt_tokens_details": {"cached_tokens": 3}}
    prefill_leg, decode_leg = p.requests[0], d.requests[0]
    pb = prefill_leg["body"]
    assert pb["max_tokens"] == 1 and pb["stream"] is False and pb["ignore_eos"] is True
    assert "min_tokens" not in pb and "stop" not in pb
    assert pb["kv_transfer_params"] == {"do_remote_decode": True, "do_remote_prefill": False,
                                        "remote_engine_id": None, "remote_block_ids": None,
                                        "remote_host": None, "remote_port": None}
    db = decode_leg["body"]
    assert db["max_tokens"] == 5 and db["min_tokens"] == 2 and db["stop"] == ["x"]
    assert db["kv_transfer_params"]["remote_engine_id"] == "eng-1"
    assert db["kv_transfer_params"]["remote_host"] == "localhost"  # loopback backend: kept
    for leg in (prefill_leg, decode_leg):
        assert leg["headers"]["x-request-id"] == "abc-123"
        assert "authorization" not in leg["headers"]  # not forwarded unless configured


async def test_authorization_forwarding_and_pool_keys(pair, start_pdlb, http):
    """Client Authorization reaches backends only when configured; else the pool's key."""
    p, d, pu, du = pair
    cfg = make_config([pu], [du], pools={"prefill": {"api_key": "pk"},
                                         "decode": {"api_key": "dk"}})
    url, _ = await start_pdlb(cfg)
    async with http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                         headers={"Authorization": "Bearer client"}) as r:
        assert r.status == 200
    assert p.requests[-1]["headers"]["authorization"] == "Bearer pk"
    assert d.requests[-1]["headers"]["authorization"] == "Bearer dk"
    cfg = make_config([pu], [du], auth={"forward_client_authorization": True})
    url, _ = await start_pdlb(cfg)
    async with http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                         headers={"Authorization": "Bearer client"}) as r:
        assert r.status == 200
    assert p.requests[-1]["headers"]["authorization"] == "Bearer client"
    assert d.requests[-1]["headers"]["authorization"] == "Bearer client"


@pytest.mark.parametrize("split,crlf", [(False, False), (True, False), (False, True), (True, True)])
async def test_stream_usage_rewrite_framings(pair, start_pdlb, http, split, crlf):
    """The final usage event is rewritten however the events are framed or split."""
    p, d, pu, du = pair
    d.split_events, d.crlf = split, crlf
    url, _ = await start_pdlb(make_config([pu], [du]))
    body = {"model": "fake", "prompt": "hi", "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    async with http.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200
        assert r.content_type == "text/event-stream"
        raw = await r.read()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert [e["choices"][0]["text"] for e in events[:3]] == ["t0 ", "t1 ", "t2 "]
    assert events[3]["choices"] == []
    assert events[3]["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
    assert events[3]["usage"]["total_tokens"] == 10
    # the prefill leg never streams and never carries stream_options
    assert p.requests[0]["body"]["stream"] is False
    assert "stream_options" not in p.requests[0]["body"]


async def test_stream_without_include_usage_has_no_usage(pair, start_pdlb, http):
    p, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2, "stream": True}
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        events = sse_events(await r.read())
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert [e["choices"][0]["delta"]["content"] for e in events[:-1]] == ["t0 ", "t1 "]


async def test_prefill_without_kv_params_is_a_clean_502(pair, start_pdlb, http):
    """A prefill answer without kv_transfer_params never reaches decode; it is counted."""
    p, d, pu, du = pair
    p.omit_kv_params = True
    url, _ = await start_pdlb(make_config([pu], [du]))
    async with http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}) as r:
        assert r.status == 502
        err = (await r.json())["error"]
    assert err["code"] == "missing_kv_transfer_params"
    assert err["type"] == "upstream_error"
    assert d.requests == []
    assert len(p.requests) == 2  # tried twice (prefill_attempts = 2), then a clean error
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    assert 'pdlb_prefill_failures_total{reason="missing_kv_transfer_params"} 2.0' in text


async def test_decode_dies_mid_stream_gives_error_event_then_done(pair, start_pdlb, http):
    p, d, pu, du = pair
    d.drop_after = 2
    url, _ = await start_pdlb(make_config([pu], [du], resilience={"migrate_attempts": 0}))
    body = {"prompt": "x", "max_tokens": 5, "stream": True}
    async with http.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200
        events = sse_events(await r.read())
    assert [e["choices"][0]["text"] for e in events[:2]] == ["t0 ", "t1 "]
    assert "error" in events[2] and events[2]["error"]["type"] == "upstream_error"
    assert events[3] == "[DONE]"


async def test_backend_4xx_is_passed_through(pair, start_pdlb, http):
    p, d, pu, du = pair
    p.status = 400
    url, _ = await start_pdlb(make_config([pu], [du]))
    async with http.post(url + "/v1/completions", json={"prompt": "x"}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["message"] == "boom"


async def test_prefill_5xx_is_a_502_with_reason(pair, start_pdlb, http):
    p, d, pu, du = pair
    p.status = 500
    p.error_body = b'{"error": {"message": "engine dead"}}'
    url, _ = await start_pdlb(make_config([pu], [du]))
    async with http.post(url + "/v1/completions", json={"prompt": "x"}) as r:
        assert r.status == 502
        assert "engine dead" in (await r.json())["error"]["message"]


@pytest.mark.parametrize(
    "payload,param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"prompt": 5}', "prompt"),
        (b'{"prompt": "x", "max_tokens": "ten"}', "max_tokens"),
        (b'{"prompt": "x", "max_tokens": 0}', "max_tokens"),
        (b'{"prompt": "x", "stream": "yes"}', "stream"),
        (b'{"prompt": "x", "stream_options": {"include_usage": true}}', "stream_options"),
        (b'{"max_tokens": 3}', "prompt"),
    ],
)
async def test_bad_input_is_400(pair, start_pdlb, http, payload, param):
    p, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    async with http.post(url + "/v1/completions", data=payload,
                         headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        err = (await r.json())["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert p.requests == [] and d.requests == []


async def test_chat_messages_validation(pair, start_pdlb, http):
    p, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    for messages in ([], [{"content": "no role"}], "hi"):
        async with http.post(url + "/v1/chat/completions", json={"messages": messages}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "messages"


async def test_unknown_route_404_and_wrong_method_405(pair, start_pdlb, http):
    p, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    async with http.get(url + "/v1/nope") as r:
        assert r.status == 404
        assert (await r.json())["error"]["type"] == "not_found_error"
    async with http.get(url + "/v1/completions") as r:
        assert r.status == 405
        assert "error" in await r.json()


async def test_oversized_body_is_413(pair, start_pdlb, http):
    p, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du], server={"port": 0, "max_body_bytes": 1000}))
    async with http.post(url + "/v1/completions", json={"prompt": "x" * 5000}) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "body_too_large"


async def test_unreachable_backends(pair, start_pdlb, http):
    """A dead prefill is a 502 (or 503 once ejected); a dead decode likewise — never a hang."""
    p, d, pu, du = pair
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    no_checks = {"interval_s": 60, "failures_to_eject": 10}
    url, _ = await start_pdlb(make_config([dead], [du], health=no_checks))
    async with http.post(url + "/v1/completions", json={"prompt": "x"}) as r:
        assert r.status == 502
        assert (await r.json())["error"]["code"] == "backend_connect_error"
    url, _ = await start_pdlb(make_config([pu], [dead], health=no_checks))
    async with http.post(url + "/v1/completions", json={"prompt": "x", "stream": True}) as r:
        assert r.status == 502
        assert (await r.json())["error"]["type"] == "upstream_error"
    url, _ = await start_pdlb(make_config([dead], [du], health={"interval_s": 60}))
    async with http.post(url + "/v1/completions", json={"prompt": "x"}) as r:
        assert r.status == 503  # ejected after two failures: the pool has no usable backend
        assert (await r.json())["error"]["code"] == "prefill_unavailable"


async def test_decode_timeout_is_504(pair, start_pdlb, http):
    p, d, pu, du = pair
    d.delay_s = 2.0
    cfg = make_config([pu], [du], server={"port": 0, "timeouts": {"first_byte_s": 0.3}})
    url, _ = await start_pdlb(cfg)
    async with http.post(url + "/v1/completions", json={"prompt": "x"}) as r:
        assert r.status == 504
        assert (await r.json())["error"]["type"] == "timeout_error"


async def test_idle_stream_timeout_ends_with_error_event(pair, start_pdlb, http):
    p, d, pu, du = pair
    d.chunk_delay_s = 1.0
    cfg = make_config([pu], [du], server={"port": 0, "timeouts": {"idle_s": 0.2}})
    url, _ = await start_pdlb(cfg)
    async with http.post(url + "/v1/completions",
                         json={"prompt": "x", "max_tokens": 3, "stream": True}) as r:
        events = sse_events(await r.read())
    assert events[0]["choices"][0]["text"] == "t0 "
    assert events[-2]["error"]["code"] == "backend_timeout"
    assert events[-1] == "[DONE]"


async def test_client_disconnect_mid_stream_aborts_decode(pair, start_pdlb, http):
    """Closing the client connection closes the decode connection at once."""
    p, d, pu, du = pair
    d.chunk_delay_s = 0.05
    url, app = await start_pdlb(make_config([pu], [du]))
    body = {"prompt": "x", "max_tokens": 200, "stream": True}
    r = await http.post(url + "/v1/completions", json=body)
    await r.content.readline()
    r.close()
    for _ in range(100):
        if d.aborted:
            break
        await asyncio.sleep(0.02)
    assert d.aborted == 1 and d.finished == 0


async def test_client_disconnect_during_prefill_cancels_it(pair, start_pdlb, http):
    p, d, pu, du = pair
    p.delay_s = 5.0
    url, _ = await start_pdlb(make_config([pu], [du]))
    task = asyncio.create_task(http.post(url + "/v1/completions", json={"prompt": "x"}))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    assert d.requests == []  # the decode leg never started


async def test_health_models_metrics(pair, start_pdlb, http):
    p, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    async with http.get(url + "/health") as r:
        assert r.status == 200
        assert (await r.json())["status"] == "ok"
    async with http.get(url + "/v1/models") as r:
        assert (await r.json())["data"][0]["id"] == "fake"
    async with http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}) as r:
        assert r.status == 200
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    for name in ("pdlb_requests_total{endpoint=\"completions\",status=\"200\"} 1.0",
                 "pdlb_ttft_seconds_count", "pdlb_prefill_duration_seconds_count",
                 "pdlb_handoff_duration_seconds_count", "pdlb_decode_duration_seconds_count",
                 'pdlb_pool_inflight_tokens{pool="decode"} 0.0',
                 "pdlb_backend_inflight_tokens"):
        assert name in text


async def test_health_503_when_a_pool_is_down(pair, start_pdlb, http):
    p, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], ["http://127.0.0.1:9"],
                                          health={"interval_s": 0.05, "timeout_s": 0.2}))
    for _ in range(100):
        async with http.get(url + "/health") as r:
            if r.status == 503:
                body = await r.json()
                break
        await asyncio.sleep(0.05)
    assert r.status == 503 and "decode" in body["reason"]
    async with http.post(url + "/v1/completions", json={"prompt": "x"}) as r:
        assert r.status == 503
        assert (await r.json())["error"]["code"] == "decode_unavailable"


async def test_backend_serving_another_model_is_kept_out(start_pdlb, http):
    """Both pools must serve the same model: a mismatched decode never gets traffic."""
    p, good, other = FakeBehaviour(), FakeBehaviour(), FakeBehaviour(model="other-model")
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", good)) as g, \
            run_app(make_fake("decode", other)) as o:
        url, app = await start_pdlb(make_config([pu], [g, o], health={"interval_s": 0.05}))
        for _ in range(100):
            async with http.get(url + "/health") as r:
                pools = (await r.json())["pools"]
            if pools["decode"]["usable_backends"] == 1:
                break
            await asyncio.sleep(0.05)
        assert pools["decode"]["usable_backends"] == 1
        for _ in range(6):
            async with http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as r:
                assert r.status == 200
        assert len(other.requests) == 0 and len(good.requests) == 6


async def test_mismatched_model_is_out_before_the_first_request(start_pdlb, http):
    """The first health round runs before pdlb listens: requests sent the moment it is up
    never reach a backend that serves another model (checks every 60 s: only that first
    round can have excluded it; the odd backend is slow to list its models, so without
    the round the first requests would reach it)."""
    p, good = FakeBehaviour(), FakeBehaviour()
    other = FakeBehaviour(model="other-model", models_delay_s=0.3)
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", good)) as g, \
            run_app(make_fake("decode", other)) as o:
        url, _ = await start_pdlb(make_config(
            [pu], [g, o], health={"interval_s": 60.0, "timeout_s": 1.0},
            pools={"decode": {"policy": "round_robin"}}))
        for _ in range(4):
            async with http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as r:
                assert r.status == 200
        assert len(other.requests) == 0 and len(good.requests) == 4


async def test_odd_model_answering_first_does_not_shut_out_the_rest(start_pdlb, http):
    """The reference model is the majority's, not the first answer's: the odd decode lists
    its models at once, the others a moment later, and still only the odd one is kept out."""
    p, good = FakeBehaviour(models_delay_s=0.2), FakeBehaviour(models_delay_s=0.2)
    other = FakeBehaviour(model="other-model")
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", good)) as g, \
            run_app(make_fake("decode", other)) as o:
        url, _ = await start_pdlb(make_config(
            [pu], [o, g], health={"interval_s": 60.0, "timeout_s": 1.0},
            pools={"decode": {"policy": "round_robin"}}))
        for _ in range(4):
            async with http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as r:
                assert r.status == 200
        assert len(other.requests) == 0 and len(good.requests) == 4
        async with http.get(url + "/health") as r:
            pools = (await r.json())["pools"]
        assert pools["prefill"]["usable_backends"] == 1
        assert pools["decode"]["usable_backends"] == 1


@pytest.mark.parametrize(
    "extra,counted",
    [
        ({}, False),  # no limit depends on the count: estimate, no tokenizer on the path
        ({"tokenizer": {"count": "always"}}, True),
        ({"server": {"port": 0, "max_prompt_tokens": 10_000}}, True),
        ({"pools": {"decode": {"max_inflight_tokens": 100_000}}}, True),
    ],
)
async def test_exact_count_only_when_a_limit_needs_it(pair, start_pdlb, http, extra, counted):
    p, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du], **extra))
    async with http.post(url + "/v1/completions", json={"prompt": "hello " * 50,
                                                         "max_tokens": 2}) as r:
        assert r.status == 200
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    assert ("pdlb_tokenize_duration_seconds_count 1.0" in text) is counted
