"""Session affinity shared through Redis (``[cluster] share_sessions``): a session first
routed by one pdlb is routed to the same decode backend by another."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from emulator import EmulatorConfig, EmulatorServer
from tests.cluster.redis_server import RedisServer
from tests.conftest import make_config


def emulator(role: str) -> EmulatorServer:
    return EmulatorServer(EmulatorConfig(role=role, time_scale=50.0, seed=5))


async def test_a_session_follows_its_backend_across_replicas(
        redis_server: RedisServer, start_pdlb: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Six sessions sent through replica A, then through replica B: B's decode backend is
    A's for every one (B alone would rotate them), and Redis holds A's choices."""
    import redis.asyncio as aioredis

    async with emulator("prefill") as p, emulator("decode") as d1, emulator("decode") as d2:
        def config() -> Any:
            return make_config([p.url], [d1.url, d2.url],
                               pools={"decode": {"policy": "session_affinity"}},
                               cluster={"redis_url": redis_server.url, "replicas": 2})
        url_a, _ = await start_pdlb(config())
        url_b, _ = await start_pdlb(config())
        caplog.set_level("INFO", logger="pdlb.access")

        async def send(url: str, session: str) -> str:
            caplog.clear()
            async with http.post(url + "/v1/completions", headers={"X-Session-Id": session},
                                 json={"model": "emulated-model", "prompt": "hello there",
                                       "max_tokens": 2}) as r:
                assert r.status == 200, await r.text()
                await r.read()
            lines = [rec.getMessage() for rec in caplog.records if rec.name == "pdlb.access"]
            hits = [u for u in (d1.url, d2.url) for line in lines if u in line]
            assert len(hits) == 1, lines
            return hits[0]

        redis = aioredis.Redis.from_url(redis_server.url)
        async with aiohttp.ClientSession() as http:
            first = {f"s{i}": await send(url_a, f"s{i}") for i in range(6)}
            assert len(set(first.values())) == 2  # A spread them over both backends
            for session, backend in first.items():
                stored = await redis.hget(f"pdlb:{{pdlb}}:session:{session}", "decode")
                assert stored is not None and stored.decode() == backend
            second = {s: await send(url_b, s) for s in first}
        await redis.aclose()
        assert second == first


async def test_admin_state_shows_the_cluster(redis_server: RedisServer, start_pdlb: Any
                                             ) -> None:
    """/admin/state: this replica's name, Redis up, the global use the last reservation
    saw, and the other replicas' numbers per backend."""
    async with emulator("prefill") as p, emulator("decode") as d:
        config = make_config([p.url], [d.url], admin={"enabled": True, "token": "t"},
                             pools={"decode": {"max_inflight_tokens": 10_000}},
                             cluster={"redis_url": redis_server.url})
        url, _ = await start_pdlb(config)
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/completions", json={
                    "model": "emulated-model", "prompt": "hi", "max_tokens": 2}) as r:
                assert r.status == 200
            async with http.get(url + "/admin/state",
                                headers={"Authorization": "Bearer t"}) as r:
                state = await r.json()
        cluster = state["cluster"]
        assert cluster["redis_up"] is True and cluster["replica"]
        assert cluster["global_admitted_tokens"]["decode"] > 0
        backend = state["pools"]["decode"]["backends"][0]
        assert backend["others_inflight_tokens"] == 0
