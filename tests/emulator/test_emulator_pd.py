"""The emulated NixlConnector handshake: prefill holds, decode pulls, failures recompute."""

from __future__ import annotations

import asyncio
import json

from tests.emulator import vllm_samples as samples
from tests.emulator.conftest import metric, post, shape, state

PROMPT = " ".join(f"Sentence {i}: the engine sends every token through the cache." for i in range(8))
PREFILL_KV = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
              "remote_block_ids": None, "remote_host": None, "remote_port": None}


async def prefill(http, url: str, prompt: str = PROMPT, **extra) -> dict:
    status, body = await post(http, url + "/v1/completions", {
        "prompt": prompt, "max_tokens": 1, "stream": False, "ignore_eos": True,
        "kv_transfer_params": PREFILL_KV, **extra})
    assert status == 200, body
    return body


async def test_prefill_returns_all_032_params_and_holds(emulator, http):
    """The prefill's kv_transfer_params have vLLM 0.32's fields; the blocks are held."""
    p = await emulator(role="prefill")
    body = await prefill(http, p.url)
    params = body["kv_transfer_params"]
    expected = json.loads(samples.COMPLETION_PREFILL)["kv_transfer_params"]
    assert list(params) == list(expected)
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_host"] == "localhost" and params["remote_port"] == p.port
    assert params["remote_num_tokens"] == prompt_tokens
    assert len(params["remote_block_ids"][0]) == -(-prompt_tokens // 16)
    assert params["remote_request_id"].startswith(body["id"] + "-0-")
    assert params["remote_prefill_cached_tokens"] == 0
    assert params["remote_engine_id"] == p.engine.engine_id
    assert body["choices"][0]["finish_reason"] == "length"
    st = await state(http, p.url)
    assert st["kv_held"] == 1 and st["kv_used_blocks"] == len(params["remote_block_ids"][0])
    chat_status, chat = await post(http, p.url + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
        "kv_transfer_params": PREFILL_KV})
    assert chat["kv_transfer_params"]["remote_request_id"].startswith(chat["id"] + "-")
    assert chat["kv_transfer_params"]["remote_request_id"].count("-") == 2  # chatcmpl-<id>-<8>


async def test_decode_pulls_counts_and_matches_colocated_text(emulator, http):
    """A decode pulls the held KV (external_kv_transfer) and outputs what 'both' outputs."""
    p = await emulator(role="prefill")
    d = await emulator(role="decode")
    b = await emulator(role="both")
    params = (await prefill(http, p.url))["kv_transfer_params"]
    status, out = await post(http, d.url + "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 10, "kv_transfer_params": params})
    assert status == 200 and out["kv_transfer_params"] is None
    _, colocated = await post(http, b.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 10})
    assert out["choices"][0]["text"] == colocated["choices"][0]["text"]
    prompt_tokens = out["usage"]["prompt_tokens"]
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # the prefill's count
    d_state, p_state = await state(http, d.url), await state(http, p.url)
    assert d_state["kv_pulled"] == 1 and d_state["kv_recomputed"] == 0
    assert p_state["kv_held"] == 0 and p_state["kv_used_blocks"] == 0
    ext = await metric(http, d.url, "vllm:prompt_tokens_by_source_total",
                       source="external_kv_transfer")
    local = await metric(http, d.url, "vllm:prompt_tokens_by_source_total", source="local_compute")
    assert (ext, local) == (prompt_tokens, 0)
    assert await metric(http, d.url, "vllm:nixl_xfer_time_seconds_count") == 1
    # A chat request goes through the same handshake.
    messages = [{"role": "user", "content": "Name three rivers."}]
    _, chat_p = await post(http, p.url + "/v1/chat/completions", {
        "messages": messages, "max_tokens": 1, "kv_transfer_params": PREFILL_KV})
    _, chat_d = await post(http, d.url + "/v1/chat/completions", {
        "messages": messages, "max_tokens": 5, "kv_transfer_params": chat_p["kv_transfer_params"]})
    assert chat_d["choices"][0]["message"]["content"].startswith(
        chat_p["choices"][0]["message"]["content"])
    assert (await state(http, d.url))["kv_pulled"] == 2


async def test_reused_mismatched_invalid_and_expired_params_recompute(emulator, http):
    """Params that are reused, for another prompt, malformed or expired → local recompute."""
    # 10 s = 0.5 s of wall time at time_scale 20: long enough for the steps before the
    # expiry check even on a loaded machine, where 0.1 s was not.
    p = await emulator(role="prefill", kv_lease_s=10.0)
    d = await emulator(role="decode")
    params = (await prefill(http, p.url))["kv_transfer_params"]
    decode = {"prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": params}
    assert (await post(http, d.url + "/v1/completions", decode))[0] == 200
    assert (await post(http, d.url + "/v1/completions", decode))[0] == 200  # reused
    other = (await prefill(http, p.url))["kv_transfer_params"]
    status, _ = await post(http, d.url + "/v1/completions", {
        "prompt": PROMPT + " and more", "max_tokens": 2, "kv_transfer_params": other})
    assert status == 200
    foreign = (await prefill(http, p.url))["kv_transfer_params"]
    assert (await post(http, d.url + "/v1/completions", {
        **decode, "kv_transfer_params": {**foreign, "remote_engine_id": "someone-else"}}))[0] == 200
    broken = {k: v for k, v in params.items() if k != "remote_engine_id"}
    assert (await post(http, d.url + "/v1/completions", {
        **decode, "kv_transfer_params": broken}))[0] == 200
    late = (await prefill(http, p.url))["kv_transfer_params"]
    for _ in range(100):  # the lease runs out after 0.5 s
        if (await state(http, p.url))["kv_held"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await state(http, p.url))["kv_held"] == 0
    assert (await post(http, d.url + "/v1/completions", {
        **decode, "kv_transfer_params": late}))[0] == 200
    st = await state(http, d.url)
    assert st["kv_pulled"] == 1
    assert st["kv_recomputed_by_reason"] == {
        "reused": 1, "prompt_mismatch": 1, "engine_mismatch": 1, "invalid_params": 1,
        "expired": 1}
    assert st["kv_recomputed"] == 5
    local = await metric(http, d.url, "vllm:prompt_tokens_by_source_total", source="local_compute")
    assert local > 0


async def test_cached_tokens_reporting_modes(emulator, http):
    """0.32 reports the prefill's remote_prefill_cached_tokens; the old mode the transfer."""
    p = await emulator(role="prefill")
    new = await emulator(role="decode")
    old = await emulator(role="decode", decode_reports_transferred_as_cached=True)
    await prefill(http, p.url)
    params = (await prefill(http, p.url))["kv_transfer_params"]  # second time: cache hits
    assert params["remote_prefill_cached_tokens"] > 0
    _, out = await post(http, new.url + "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": params})
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == \
        params["remote_prefill_cached_tokens"]
    params = (await prefill(http, p.url))["kv_transfer_params"]
    _, out = await post(http, old.url + "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": params})
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == out["usage"]["prompt_tokens"]


async def test_unreachable_prefill_fails_like_vllm_or_recomputes(emulator, http):
    """No side channel at remote_port: 500 after the pull timeout (or recompute if asked)."""
    fail = await emulator(role="decode", kv_pull_timeout_s=2.0)
    params = {"do_remote_prefill": True, "do_remote_decode": False,
              "remote_block_ids": [[1, 2, 3]], "remote_engine_id": "0000",
              "remote_request_id": "cmpl-nothing-0-12345678", "remote_host": "127.0.0.1",
              "remote_port": 9, "remote_num_tokens": 4}
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, body = await post(http, fail.url + "/v1/completions", {
        "prompt": "The cat runs", "max_tokens": 3, "kv_transfer_params": params})
    assert (status, body) == (500, json.loads(samples.DECODE_UNREACHABLE))
    assert loop.time() - started >= 0.09  # 2 model seconds at time_scale 20
    st = await state(http, fail.url)
    assert st["kv_pull_failed"] == 1 and st["running"] == 0 and st["kv_used_blocks"] == 0
    async with http.get(fail.url + "/health") as resp:
        assert resp.status == 200
    lenient = await emulator(role="decode", kv_load_failure_policy="recompute",
                             kv_pull_timeout_s=2.0)
    status, body = await post(http, lenient.url + "/v1/completions", {
        "prompt": "The cat runs", "max_tokens": 3, "kv_transfer_params": params})
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert (await state(http, lenient.url))["kv_recomputed_by_reason"] == {"unreachable": 1}


async def test_decode_abort_releases_the_prefill_hold(emulator, http):
    """A decode aborted before it pulled tells the prefill to free the blocks."""
    p = await emulator(role="prefill")
    # A decode whose KV is full of a long-running request, so the next one waits.
    d = await emulator(role="decode", kv_capacity_tokens=160, max_model_len=160, time_scale=1)
    busy = asyncio.create_task(post(http, d.url + "/v1/completions",
                                    {"prompt": list(range(100, 230)), "max_tokens": 25}))
    await asyncio.sleep(0.05)
    params = (await prefill(http, p.url))["kv_transfer_params"]
    assert (await state(http, p.url))["kv_held"] == 1
    waiting = asyncio.create_task(post(http, d.url + "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 5, "kv_transfer_params": params}))
    await asyncio.sleep(0.05)
    assert (await state(http, d.url))["waiting"] == 1
    waiting.cancel()
    await asyncio.sleep(0.1)
    d_state, p_state = await state(http, d.url), await state(http, p.url)
    assert d_state["requests_aborted"] == 1
    assert p_state["kv_held"] == 0 and p_state["kv_holds_released"] == 1
    assert (await busy)[0] == 200
    assert (await state(http, d.url))["kv_used_blocks"] == 0


async def test_prefill_shapes_for_chat_and_for_a_natural_eos(emulator, http):
    """Chat prefill and an EOS-first prefill look like vLLM 0.32's (params still returned)."""
    p = await emulator(role="prefill")
    _, chat = await post(http, p.url + "/v1/chat/completions", {
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Name three rivers."}],
        "max_tokens": 1, "ignore_eos": True, "stream": False, "kv_transfer_params": PREFILL_KV})
    assert shape(chat) == shape(json.loads(samples.CHAT_PREFILL))
    eos = await emulator(role="prefill", eos_probability=1.0)
    body = await prefill(http, eos.url, "The cat runs", ignore_eos=False)
    assert shape(body) == shape(json.loads(samples.PREFILL_EOS))
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["text"] == ""
    assert body["kv_transfer_params"]["remote_num_tokens"] == body["usage"]["prompt_tokens"]
