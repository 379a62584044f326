"""Fault knobs (flags and /_emulator/faults) and client aborts do what they say."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.emulator.conftest import post, state

PREFILL_KV = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
              "remote_block_ids": None, "remote_host": None, "remote_port": None}


async def set_faults(http, url: str, **faults) -> dict:
    status, body = await post(http, url + "/_emulator/faults", faults)
    assert status == 200, body
    return body


async def test_admin_endpoint_merges_validates_and_resets(emulator, http):
    """POST merges partial updates, GET shows them, bad input is refused, reset restores."""
    s = await emulator(role="both", extra_latency_ms=1.0)
    async with http.get(s.url + "/_emulator/faults") as resp:
        assert await resp.json() == {"fail_rate": 0.0, "drop_after_chunks": None,
                                     "omit_kv_params": False, "extra_latency_ms": 1.0,
                                     "unhealthy": False, "stop_after_first_token": False}
    await set_faults(http, s.url, fail_rate=0.5)
    body = await set_faults(http, s.url, unhealthy=True)
    assert body["fail_rate"] == 0.5 and body["unhealthy"] is True
    for bad in ({"nope": 1}, {"fail_rate": 2}, {"unhealthy": "yes"}, {"drop_after_chunks": -1}):
        status, err = await post(http, s.url + "/_emulator/faults", bad)
        assert status == 400 and "error" in err
    assert (await post(http, s.url + "/_emulator/faults", {}))[1]["fail_rate"] == 0.5
    await post(http, s.url + "/v1/completions", {"prompt": "x", "max_tokens": 1})
    status, _ = await post(http, s.url + "/_emulator/reset", {})
    assert status == 200
    st = await state(http, s.url)
    assert st["faults"]["fail_rate"] == 0.0 and st["faults"]["extra_latency_ms"] == 1.0
    assert st["requests_total"] == 0 and st["recent_requests"] == []


async def test_fail_rate_answers_500_in_vllm_shape(emulator, http):
    """fail_rate=1 fails every completion with an InternalServerError body; 0.5 about half."""
    s = await emulator(role="both", fail_rate=1.0)
    status, body = await post(http, s.url + "/v1/completions", {"prompt": "x"})
    assert status == 500 and body["error"]["type"] == "InternalServerError"
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == 500
    await set_faults(http, s.url, fail_rate=0.5)
    results = [(await post(http, s.url + "/v1/completions", {"prompt": "x", "max_tokens": 1}))[0]
               for _ in range(40)]
    assert 8 <= results.count(500) <= 32 and results.count(200) == 40 - results.count(500)
    assert (await state(http, s.url))["requests_failed"] == 1 + results.count(500)


async def test_drop_after_chunks_cuts_streams_and_bodies(emulator, http):
    """Streams end after N events without [DONE]; non-streamed requests get no response."""
    s = await emulator(role="both", drop_after_chunks=2)
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(s.url + "/v1/completions",
                             json={"prompt": "x", "max_tokens": 20, "stream": True}) as resp:
            assert resp.status == 200
            async for data in resp.content.iter_any():
                received += data
    assert received.count(b"data: ") == 2 and b"[DONE]" not in received
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(http, s.url + "/v1/completions", {"prompt": "x", "max_tokens": 3})
    st = await state(http, s.url)
    assert st["requests_dropped"] == 2 and st["requests_aborted"] == 0
    assert st["running"] == 0 and st["kv_used_blocks"] == 0


async def test_omit_kv_params_and_stop_after_first_token(emulator, http):
    """The prefill answers without kv_transfer_params (and holds nothing)."""
    p = await emulator(role="prefill", omit_kv_params=True)
    body = {"prompt": "The cat runs", "max_tokens": 1, "kv_transfer_params": PREFILL_KV}
    _, out = await post(http, p.url + "/v1/completions", body)
    assert out["kv_transfer_params"] is None and out["choices"][0]["finish_reason"] == "length"
    await set_faults(http, p.url, omit_kv_params=False, stop_after_first_token=True)
    _, out = await post(http, p.url + "/v1/completions", body)
    assert out["kv_transfer_params"] is None
    assert out["choices"][0]["finish_reason"] == "stop" and out["choices"][0]["text"] == ""
    assert out["usage"]["completion_tokens"] == 1
    st = await state(http, p.url)
    assert st["kv_held"] == 0 and st["kv_used_blocks"] == 0
    await set_faults(http, p.url, stop_after_first_token=False)
    _, out = await post(http, p.url + "/v1/completions", body)
    assert out["kv_transfer_params"] is not None


async def test_extra_latency_and_unhealthy(emulator, http):
    """extra_latency_ms delays the first byte; unhealthy turns /health into 503."""
    s = await emulator(role="both", time_scale=100)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await post(http, s.url + "/v1/completions", {"prompt": "x", "max_tokens": 1})
    fast = loop.time() - t0
    await set_faults(http, s.url, extra_latency_ms=150)
    t0 = loop.time()
    await post(http, s.url + "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert loop.time() - t0 >= 0.15 > fast
    async with http.get(s.url + "/health") as resp:
        assert resp.status == 200
    await set_faults(http, s.url, unhealthy=True)
    async with http.get(s.url + "/health") as resp:
        assert resp.status == 503


async def test_client_disconnect_aborts_streamed_and_non_streamed(emulator, http):
    """A client that goes away is counted in requests_aborted and its KV freed at once."""
    s = await emulator(role="both", time_scale=5)
    async with http.post(s.url + "/v1/completions",
                         json={"prompt": "x", "max_tokens": 500, "stream": True}) as resp:
        seen = 0
        async for _ in resp.content:
            seen += 1
            if seen > 6:
                break
        resp.close()
    task = asyncio.create_task(post(http, s.url + "/v1/completions",
                                    {"prompt": "y", "max_tokens": 500}))
    await asyncio.sleep(0.05)
    assert (await state(http, s.url))["running"] == 1
    task.cancel()
    for _ in range(100):
        st = await state(http, s.url)
        if st["requests_aborted"] == 2:
            break
        await asyncio.sleep(0.01)
    assert st["requests_aborted"] == 2 and st["running"] == 0 and st["kv_used_blocks"] == 0
    assert st["requests_finished"] == 0


async def test_recent_requests_show_what_arrived(emulator, http):
    """/_emulator/state keeps path, lower-case headers and body of recent requests."""
    s = await emulator(role="prefill", recent_requests_max=2)
    for i in range(3):
        async with http.post(s.url + "/v1/completions",
                             json={"prompt": f"p{i}", "max_tokens": 1, "stream": False},
                             headers={"X-Request-Id": f"rid-{i}"}) as resp:
            await resp.read()
    recent = (await state(http, s.url))["recent_requests"]
    assert [r["body"]["prompt"] for r in recent] == ["p1", "p2"]
    assert recent[-1]["path"] == "/v1/completions"
    assert recent[-1]["headers"]["x-request-id"] == "rid-2"
    assert recent[-1]["body"]["max_tokens"] == 1 and recent[-1]["body"]["stream"] is False
