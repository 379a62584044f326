"""Several model groups ([models]) on one shared Redis: each group's budgets are its own
(its pools' names are its stages there), and each is global across the replicas. Real
redis-server, two real pdlb replicas, one emulator pair per model."""

from __future__ import annotations

from typing import Any

import aiohttp

from emulator import EmulatorConfig, EmulatorServer
from lb.config import parse_config
from tests.cluster.redis_server import RedisServer

PROMPT = "Budgets per model across replicas. " * 3


def body(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "prompt": PROMPT, "max_tokens": 560, "stream": stream}


async def test_each_model_has_its_own_budget_shared_by_the_replicas(
        redis_server: RedisServer, start_pdlb: Any) -> None:
    async with EmulatorServer(EmulatorConfig(role="prefill", model="alpha")) as ap, \
            EmulatorServer(EmulatorConfig(role="decode", model="alpha")) as ad, \
            EmulatorServer(EmulatorConfig(role="prefill", model="beta")) as bp, \
            EmulatorServer(EmulatorConfig(role="decode", model="beta")) as bd:
        def group(p: EmulatorServer, d: EmulatorServer) -> dict[str, Any]:
            return {"pools": {"prefill": {"backends": [p.url]},
                              "decode": {"backends": [d.url], "max_inflight_tokens": 1000,
                                         "queue_timeout_s": 0.5}}}
        config = parse_config({
            "server": {"port": 0}, "health": {"interval_s": 0.2, "timeout_s": 0.5},
            "tokenizer": {"kind": "emulator"},
            "cluster": {"redis_url": redis_server.url, "replicas": 2, "timeout_ms": 300.0},
            "models": {"alpha": group(ap, ad), "beta": group(bp, bd)}}, "<test>")
        a, _ = await start_pdlb(config)
        b, _ = await start_pdlb(config)
        async with aiohttp.ClientSession() as http:
            # replica a holds ~600 of alpha's 1000 decode tokens with a stream left open
            held = await http.post(a + "/v1/completions", json=body("alpha", stream=True))
            assert held.status == 200
            await held.content.readline()
            try:
                # alpha is full for the other replica too; beta is not
                async with http.post(b + "/v1/completions", json=body("alpha")) as r:
                    answer = await r.json()
                    assert r.status == 503, answer
                    assert "alpha/decode" in answer["error"]["message"]
                async with http.post(b + "/v1/completions", json=body("beta")) as r:
                    assert r.status == 200, await r.text()
            finally:
                held.close()
            # the held tokens come back (the lease is adjusted when the stream ends)
            for _ in range(50):
                async with http.post(b + "/v1/completions",
                                     json={**body("alpha"), "max_tokens": 1}) as r:
                    if r.status == 200:
                        break
            assert r.status == 200
