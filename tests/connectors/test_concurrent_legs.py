"""Concurrent connectors (nixl_push, mooncake, sglang) on the emulator: fresh transfer ids on
retries, one leg's failure cancels the other, a client disconnect cancels both, and what a
prefill staged is released or left to its lease — nothing leaks."""

from __future__ import annotations

import asyncio

import pytest

from tests.connectors.kvpd import CONCURRENT, MODEL, eventually, idle, legs, state

ONE_TRY = {"resilience": {"prefill_attempts": 1, "decode_attempts": 1}}
BODY = {"model": MODEL, "prompt": "a prompt of some length " * 30, "max_tokens": 4}


def transfer_key(connector: str, body: dict) -> object:
    if connector == "sglang":
        return body["bootstrap_room"]
    return body["kv_transfer_params"]["transfer_id"]


@pytest.mark.parametrize("connector", CONCURRENT)
async def test_retry_gets_a_fresh_transfer_id(make_pd, http, connector):
    """The first prefill answers 500: the pair is cancelled and redone on the other prefill
    with a new transfer id / room; the decode that served took the new one's KV."""
    async with make_pd(connector, 2, 1) as pd:
        bad, good = pd.prefills
        bad.engine.faults.fail_rate = 1.0
        for _ in range(2):  # round robin: at least one request starts on the bad one
            async with http.post(pd.url + "/v1/completions", json=BODY) as r:
                assert r.status == 200, await r.text()
        failed = [transfer_key(connector, leg["body"]) for leg in legs(bad)]
        served = [transfer_key(connector, leg["body"]) for leg in legs(good)]
        decoded = [transfer_key(connector, leg["body"]) for leg in legs(pd.d)]
        assert len(failed) >= 1 and len(served) == 2
        assert len(set(failed + served)) == len(failed) + 2  # never reused, retries included
        assert set(served) <= set(decoded)
        ds = state(pd.d)
        assert ds["kv_pulled"] == 2 and ds["kv_recomputed"] == 0
        await eventually(lambda: idle(pd.d) and state(good)["kv_held"] == 0)


@pytest.mark.parametrize("connector", CONCURRENT)
async def test_failed_prefill_cancels_the_waiting_decode(make_pd, http, connector):
    """A prefill failing (after 300 ms) while the decode waits for its KV: the decode is
    aborted at once, nothing is recomputed, and the client gets a clean 502."""
    async with make_pd(connector, prefill={"extra_latency_ms": 300, "fail_rate": 1.0},
                       pdlb=ONE_TRY) as pd:
        async with http.post(pd.url + "/v1/completions", json=BODY) as r:
            assert r.status == 502
        await eventually(lambda: state(pd.d)["requests_aborted"] == 1 and idle(pd.d))
        ds = state(pd.d)
        assert ds["kv_pulled"] == 0 and ds["kv_recomputed"] == 0 and ds["requests_finished"] == 0
        await eventually(lambda: idle(pd.p))  # the decode's wait at the prefill ended too


@pytest.mark.parametrize("connector", CONCURRENT)
async def test_failed_decode_cancels_the_running_prefill(make_pd, http, connector):
    """A decode failing while the prefill still computes: the prefill is aborted (vLLM frees
    its blocks) and stages nothing."""
    async with make_pd(connector, prefill={"prefill_tokens_per_s": 400.0, "time_scale": 1.0},
                       decode={"extra_latency_ms": 100, "fail_rate": 1.0}, pdlb=ONE_TRY) as pd:
        async with http.post(pd.url + "/v1/completions", json=BODY) as r:
            assert r.status == 500  # the decode's own error, passed through
        await eventually(lambda: state(pd.p)["requests_aborted"] == 1 and idle(pd.p))
        ps = state(pd.p)
        assert ps["kv_held"] == 0 and ps["kv_held_total"] == 0 and ps["kv_used_blocks"] == 0


@pytest.mark.parametrize("connector", CONCURRENT)
async def test_client_disconnect_cancels_both_legs(make_pd, http, connector):
    """The client leaves while the prefill computes and the decode waits: both abort, the
    prefill stages nothing, no KV blocks stay allocated anywhere."""
    async with make_pd(connector, prefill={"prefill_tokens_per_s": 400.0, "time_scale": 1.0},
                       pdlb=ONE_TRY) as pd:
        r = await http.post(pd.url + "/v1/completions", json={**BODY, "stream": True})
        assert r.status == 200  # headers came: the decode accepted the request
        await eventually(lambda: state(pd.d)["waiting"] == 1 and state(pd.p)["running"] == 1)
        r.close()
        await eventually(lambda: state(pd.p)["requests_aborted"] == 1
                         and state(pd.d)["requests_aborted"] == 1)
        await eventually(lambda: idle(pd.p) and idle(pd.d))
        for s in (state(pd.p), state(pd.d)):
            assert s["kv_used_blocks"] == 0 and s["kv_held"] == 0
        assert state(pd.p)["kv_held_total"] == 0


@pytest.mark.parametrize("connector", CONCURRENT)
async def test_staged_kv_of_a_failed_decode_is_left_to_its_lease(make_pd, http, connector):
    """The prefill finished and staged its KV, then the decode failed before it registered:
    nothing in the protocol lets pdlb release it, so the lease ends it (documented)."""
    async with make_pd(connector, prefill={"kv_lease_s": 6.0},
                       decode={"extra_latency_ms": 300, "fail_rate": 1.0}, pdlb=ONE_TRY) as pd:
        async with http.post(pd.url + "/v1/completions", json=BODY) as r:
            assert r.status == 500
        assert state(pd.p)["kv_held_total"] == 1
        await eventually(lambda: state(pd.p)["kv_held"] == 0)
        ps = state(pd.p)
        assert ps["kv_holds_expired"] == 1 and ps["kv_used_blocks"] == 0


async def test_decode_that_gave_up_releases_the_key_before_the_prefill_stages(http, make_pd):
    """Emulator side of cleanup: a push decode aborted while waiting tells the prefill, whose
    KV, staged later, is freed at once instead of waiting for the lease."""
    async with make_pd("nixl_push") as pd:
        params = {"do_remote_decode": False, "do_remote_prefill": True,
                  "remote_engine_id": pd.p.engine.engine_id, "remote_host": "127.0.0.1",
                  "remote_port": pd.p.port, "tp_size": 1, "transfer_id": "xfer-early"}
        r = await http.post(pd.d.url + "/v1/completions", json={**BODY, "stream": True,
                                                                 "kv_transfer_params": params})
        await eventually(lambda: state(pd.p)["kv_awaiting"] == 1)
        r.close()
        await eventually(lambda: state(pd.d)["requests_aborted"] == 1 and idle(pd.p))
        await asyncio.sleep(0.05)  # the release notification
        prefill = {**BODY, "max_tokens": 1, "kv_transfer_params": {
            "do_remote_decode": True, "transfer_id": "xfer-early"}}
        async with http.post(pd.p.url + "/v1/completions", json=prefill) as resp:
            assert resp.status == 200
        ps = state(pd.p)
        assert ps["kv_held"] == 0 and ps["kv_holds_released"] == 1 and ps["kv_used_blocks"] == 0
