"""One connector at a time: vetoes, fragilities and what each emulator mode counts."""

from __future__ import annotations

import socket

import pytest

from lb.serve.app import METRICS
from tests.conftest import make_config
from tests.connectors.kvpd import MODEL, emulators, eventually, idle, legs, pd_config, state


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


BODY = {"model": MODEL, "prompt": "some words to prefill " * 20, "max_tokens": 3}


async def test_nixl_push_wrong_engine_id_is_vetoed_not_waited_for(start_pdlb, http):
    """A configured engine id that is not the prefill's: every prefill answer is vetoed, the
    waiting decode is cancelled (it would wait for a push that never comes), 502."""
    async with emulators("nixl_push", 1, 1, prefill={"extra_latency_ms": 100, "kv_lease_s": 6.0}
                         ) as (ps, ds):
        p, d = ps[0], ds[0]
        wrong = {"backends": {p.url: {"engine_id": "not-the-engine", "side_channel_port": p.port}}}
        url, app = await start_pdlb(pd_config("nixl_push", ps, ds, wrong,
                                              resilience={"prefill_attempts": 2}))
        async with http.post(url + "/v1/completions", json=BODY) as r:
            assert r.status == 502
            assert (await r.json())["error"]["code"] == "engine_id_mismatch"
        text = app[METRICS].render().decode()
        assert 'pdlb_prefill_failures_total{reason="engine_id_mismatch"} 2.0' in text
        await eventually(lambda: idle(d) and state(d)["requests_aborted"] == 2)
        assert state(d)["requests_finished"] == 0  # no silently recomputed answer went out
        await eventually(lambda: state(p)["kv_held"] == 0, 3.0)  # staged KV: left to its lease


async def test_p2p_nccl_with_request_id_randomization_never_matches(make_pd, http):
    """vLLM >= #27987 without VLLM_DISABLE_REQUEST_ID_RANDOMIZATION: P and D key the KV by
    differently suffixed ids, the decode waits in vain and recomputes — the fragility."""
    async with make_pd("p2p_nccl", request_id_randomization=True, kv_wait_timeout_s=4.0,
                       kv_load_failure_policy="recompute", kv_lease_s=6.0) as pd:
        async with http.post(pd.url + "/v1/completions", json=BODY) as r:
            assert r.status == 200
        ds = state(pd.d)
        assert ds["kv_pulled"] == 0 and ds["kv_recomputed_by_reason"] == {"timeout": 1}
        await eventually(lambda: state(pd.p)["kv_held"] == 0, 3.0)  # left to its lease


async def test_p2p_nccl_decode_retry_redoes_the_prefill_for_the_new_decode(start_pdlb, http):
    """The request id names the decode, so when the first decode is unreachable the retry
    prefills again with an id naming the second one (the KV went to the first)."""
    dead = f"http://127.0.0.1:{free_port()}"
    async with emulators("p2p_nccl", 1, 1) as ((p,), (d,)):
        zmq = {u: {"zmq_address": u.removeprefix("http://")} for u in (p.url, d.url, dead)}
        cfg = make_config([p.url], [dead, d.url],
                          kv_transfer={"connector": "p2p_nccl", "backends": zmq},
                          pools={"decode": {"policy": "round_robin"}},
                          resilience={"decode_attempts": 2},
                          health={"interval_s": 30, "failures_to_eject": 100})
        url, _ = await start_pdlb(cfg)
        async with http.post(url + "/v1/completions", json=BODY) as r:
            assert r.status == 200, await r.text()
        first, second = (leg["headers"]["x-request-id"] for leg in legs(p))
        assert f"___decode_addr_{dead.removeprefix('http://')}_" in first
        assert f"___decode_addr_127.0.0.1:{d.port}_" in second
        assert state(d)["kv_pulled"] == 1


@pytest.mark.parametrize("connector", ["shared_storage", "lmcache"])
async def test_shared_store_counts_misses_when_the_prompt_differs(make_pd, http, connector):
    """A decode whose prompt renders other tokens than the prefill's finds nothing in the
    store and computes the prompt itself (counted as a miss and as local_compute)."""
    async with make_pd(connector) as pd:
        async with http.post(pd.d.url + "/v1/completions",
                             json={**BODY, "prompt": "never prefilled " * 10}) as r:
            assert r.status == 200
        async with http.post(pd.url + "/v1/completions", json=BODY) as r:
            assert r.status == 200
        ds = state(pd.d)
        assert ds["kv_storage_misses"] == 1 and ds["kv_storage_hits"] == 1
        assert ds["kv_recomputed_by_reason"] == {"storage_miss": 1}


async def test_sglang_prefill_computes_one_token_whatever_max_tokens(make_pd, http):
    """The emulated SGLang prefill stops after the first token even though pdlb sends it the
    client's max_tokens (as SGLang's router does)."""
    async with make_pd("sglang") as pd:
        async with http.post(pd.url + "/v1/completions", json={**BODY, "max_tokens": 50}) as r:
            assert r.status == 200
            assert (await r.json())["usage"]["completion_tokens"] == 50
        (p,) = legs(pd.p)
        assert p["body"]["max_tokens"] == 50
        assert state(pd.p)["generated_tokens"] == 1
