"""What each connector puts on each leg, read back from the emulators' recent requests."""

from __future__ import annotations

import re

import pytest

from tests.connectors.kvpd import MODEL, legs, state

BODY = {"model": MODEL, "prompt": "tell me a story " * 8, "max_tokens": 7, "stream": True,
        "stream_options": {"include_usage": True}, "min_tokens": 2, "stop": ["zzz"]}


async def send(http, pd, body=BODY, headers=None) -> None:
    async with http.post(pd.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        await r.read()


def assert_one_token_prefill(body: dict) -> None:
    assert body["max_tokens"] == 1 and body["stream"] is False and body["ignore_eos"] is True
    for gone in ("stream_options", "min_tokens", "stop"):
        assert gone not in body
    assert body["prompt"] == BODY["prompt"]


async def test_nixl_push_legs(make_pd, http):
    """Prefill: NIXL template + transfer_id; decode: the prefill engine's coordinates from
    config, remote_request_id = the legs' X-Request-Id, the same transfer_id, no block ids."""
    async with make_pd("nixl_push", kv_options={"tp_size": 1}) as pd:
        await send(http, pd)
        (p,), (d,) = legs(pd.p), legs(pd.d)
        assert_one_token_prefill(p["body"])
        pk = p["body"]["kv_transfer_params"]
        assert pk["do_remote_decode"] is True and pk["do_remote_prefill"] is False
        assert re.fullmatch(r"xfer-[0-9a-f]{32}", pk["transfer_id"])
        dk = d["body"]["kv_transfer_params"]
        assert dk == {"do_remote_decode": False, "do_remote_prefill": True,
                      "remote_engine_id": pd.p.engine.engine_id, "remote_host": "127.0.0.1",
                      "remote_port": pd.p.port, "tp_size": 1, "pp_size": 1,
                      "remote_request_id": d["headers"]["x-request-id"],
                      "transfer_id": pk["transfer_id"]}
        assert p["headers"]["x-request-id"] == d["headers"]["x-request-id"]
        assert {k: v for k, v in d["body"].items() if k != "kv_transfer_params"} == BODY


async def test_mooncake_legs(make_pd, http):
    """Prefill: transfer_id + X-data-parallel-rank (pdlb's, over the client's); decode:
    bootstrap address, the engine id listed for that rank, the same transfer_id."""
    async with make_pd("mooncake", decode={"data_parallel_size": 8}) as pd:
        await send(http, pd, headers={"X-data-parallel-rank": "5"})
        (p,), (d,) = legs(pd.p), legs(pd.d)
        # pdlb's rank replaces the client's on the prefill leg (one header, not two); the
        # decode leg keeps the client's, which addresses the decode's own DP ranks
        assert d["headers"]["x-data-parallel-rank"] == "5"
        assert_one_token_prefill(p["body"])
        pk = p["body"]["kv_transfer_params"]
        assert pk == {"do_remote_decode": True, "do_remote_prefill": False,
                      "transfer_id": pk["transfer_id"]}
        assert p["headers"]["x-data-parallel-rank"] == "0"
        assert d["body"]["kv_transfer_params"] == {
            "do_remote_decode": False, "do_remote_prefill": True,
            "remote_bootstrap_addr": f"http://127.0.0.1:{pd.p.port}",
            "remote_engine_id": pd.p.engine.engine_id, "transfer_id": pk["transfer_id"]}


async def test_mooncake_spreads_dp_ranks_with_their_engine_ids(make_pd, http):
    """A prefill with two DP ranks: requests alternate ranks, each decode names the engine
    of the rank its prefill ran on (a wrong one would be an engine mismatch)."""
    async with make_pd("mooncake", prefill={"data_parallel_size": 2}) as pd:
        for _ in range(4):
            await send(http, pd)
        ranks = [p["headers"]["x-data-parallel-rank"] for p in legs(pd.p)]
        engines = [d["body"]["kv_transfer_params"]["remote_engine_id"] for d in legs(pd.d)]
        base = pd.p.engine.engine_id
        assert ranks == ["0", "1", "0", "1"]
        assert engines == [f"{base}_dp0", f"{base}_dp1", f"{base}_dp0", f"{base}_dp1"]
        assert state(pd.d)["kv_pulled"] == 4 and state(pd.d)["kv_recomputed"] == 0


async def test_p2p_nccl_request_id_names_both_zmq_addresses(make_pd, http):
    """Both legs share ___prefill_addr_P___decode_addr_D_<uuid>; no handshake fields; the
    client's own X-Request-Id does not reach the backends."""
    async with make_pd("p2p_nccl") as pd:
        await send(http, pd, headers={"X-Request-Id": "client-id"})
        (p,), (d,) = legs(pd.p), legs(pd.d)
        rid = p["headers"]["x-request-id"]
        assert rid == d["headers"]["x-request-id"]
        assert re.fullmatch(rf"___prefill_addr_127\.0\.0\.1:{pd.p.port}___decode_addr_"
                            rf"127\.0\.0\.1:{pd.d.port}_[0-9a-f]{{32}}", rid)
        assert_one_token_prefill(p["body"])
        assert "kv_transfer_params" not in p["body"] and d["body"] == BODY


async def test_sglang_same_bootstrap_fields_on_both_legs(make_pd, http):
    """bootstrap_host/port/room identical on both legs, room a 63-bit integer; the prefill
    is the client's body, only made non-streamed."""
    async with make_pd("sglang") as pd:
        await send(http, pd)
        await send(http, pd)
        (p1, p2), (d1, d2) = legs(pd.p), legs(pd.d)
        for p, d in ((p1, d1), (p2, d2)):
            boot = {k: p["body"][k] for k in ("bootstrap_host", "bootstrap_port",
                                              "bootstrap_room")}
            assert boot["bootstrap_host"] == "127.0.0.1" and boot["bootstrap_port"] == pd.p.port
            assert 0 <= boot["bootstrap_room"] < 2**63
            assert {k: d["body"][k] for k in boot} == boot
            assert {k: v for k, v in d["body"].items() if k not in boot} == BODY
            rest = {k: v for k, v in p["body"].items() if k not in boot}
            assert rest == {**{k: v for k, v in BODY.items() if k != "stream_options"},
                            "stream": False}
        assert p1["body"]["bootstrap_room"] != p2["body"]["bootstrap_room"]


@pytest.mark.parametrize("connector", ["shared_storage", "lmcache"])
async def test_plain_connectors_send_identical_prompts(make_pd, http, connector):
    """No handshake: a one-token prefill, then the client's body; same prompt on both legs;
    the decode found the prompt in the store."""
    async with make_pd(connector) as pd:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 40}],
                "max_tokens": 3, "add_generation_prompt": True}
        async with http.post(pd.url + "/v1/chat/completions", json=chat) as r:
            assert r.status == 200
        (p,), (d,) = legs(pd.p), legs(pd.d)
        assert p["body"]["messages"] == d["body"]["messages"] == chat["messages"]
        assert p["body"]["add_generation_prompt"] is True and p["body"]["max_tokens"] == 1
        assert d["body"] == chat
        ps, ds = state(pd.p), state(pd.d)
        assert ps["kv_storage_writes"] == 1 and ds["kv_storage_hits"] == 1
        assert ds["kv_storage_misses"] == 0
