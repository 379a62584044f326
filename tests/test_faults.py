"""Fault injection on real processes: every request ends complete or as a well-formed error.

Emulated backends run as separate processes (so ``kill -9`` is real); pdlb runs in-process
so the zero-counter fixture can check its accounting after each scenario. For every request
the client sees one of: a complete answer (all tokens, then ``[DONE]`` for streams), a JSON
error with a 4xx/5xx status, or — when the failure came after the stream started — an SSE
error event followed by ``[DONE]``. Never a hang past the deadline, never a silent cut.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from emulator.cluster import EmulatorCluster
from tests.conftest import make_config

pytestmark = pytest.mark.timeout(180)
DEADLINE_S = 20.0


async def outcome(http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                  disconnect_after: int | None = None) -> str:
    """Classify one request's end as the client saw it."""
    try:
        async with asyncio.timeout(DEADLINE_S):
            async with http.post(url + "/v1/completions", json=body) as r:
                if r.status != 200:
                    err = await r.json(content_type=None)
                    ok = isinstance(err, dict) and {"message", "type"} <= set(err.get("error", {}))
                    return f"error_{r.status}" if ok else "malformed_error"
                if not body.get("stream"):
                    data = await r.json()
                    n = data["usage"]["completion_tokens"]
                    return "complete" if n == body["max_tokens"] else "short"
                events = 0
                tokens = 0
                async for line in r.content:
                    if not line.startswith(b"data: "):
                        continue
                    events += 1
                    if disconnect_after is not None and events >= disconnect_after:
                        return "disconnected"
                    payload = line[6:].strip()
                    if payload == b"[DONE]":
                        return "complete" if tokens == body["max_tokens"] else "truncated"
                    event = orjson.loads(payload)
                    if "error" in event:
                        rest = await r.read()
                        return "stream_error" if b"data: [DONE]" in rest else "error_without_done"
                    tokens += len(event.get("choices") or ())
                return "cut_without_done"
    except TimeoutError:
        return "hung"


GOOD = {"complete", "stream_error", "disconnected"} | {f"error_{s}" for s in
                                                       (429, 502, 503, 504)}


@pytest.fixture
async def cluster() -> AsyncIterator[EmulatorCluster]:
    async with EmulatorCluster(prefill=2, decode=2, mode="subprocess", time_scale=10.0,
                               seed=3) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


def fast_health() -> dict[str, Any]:
    return {"interval_s": 0.1, "timeout_s": 0.3, "failures_to_eject": 1}


async def test_kill_9_a_decode_mid_stream(cluster, start_pdlb, http):
    # Migration off: this checks the honest ending (tests/test_migration.py the migrating one).
    url, _ = await start_pdlb(make_config(cluster.prefill_urls, cluster.decode_urls,
                                          health=fast_health(),
                                          resilience={"migrate_attempts": 0}))
    body = {"model": "emulated-model", "prompt": "kill test " * 40, "max_tokens": 3000,
            "stream": True}
    tasks = [asyncio.create_task(outcome(http, url, body)) for _ in range(12)]
    await asyncio.sleep(1.0)
    victim = cluster.processes[2]  # the first decode server
    victim.kill()
    results = Counter(await asyncio.gather(*tasks))
    assert set(results) <= GOOD, results
    assert results["stream_error"] >= 1  # some streams were on the killed server
    # afterwards the pool routes around the dead server
    after = Counter(await asyncio.gather(*(outcome(http, url, {**body, "max_tokens": 20})
                                           for _ in range(8))))
    assert after == Counter({"complete": 8}), after


async def test_prefill_omitting_params_and_failing_is_retried(cluster, start_pdlb, http):
    async with http.post(cluster.prefill_urls[0] + "/_emulator/faults",
                         json={"omit_kv_params": True}) as r:
        assert r.status == 200
    async with http.post(cluster.prefill_urls[1] + "/_emulator/faults",
                         json={"fail_rate": 0.3}) as r:
        assert r.status == 200
    url, _ = await start_pdlb(make_config(cluster.prefill_urls, cluster.decode_urls,
                                          health={"interval_s": 5, "failures_to_eject": 100},
                                          resilience={"prefill_attempts": 3}))
    body = {"model": "emulated-model", "prompt": "retry " * 30, "max_tokens": 10}
    results = Counter(await asyncio.gather(*(outcome(http, url, body) for _ in range(30))))
    assert set(results) <= GOOD, results
    assert results["complete"] >= 25, results


async def test_slow_backend_times_out_cleanly(cluster, start_pdlb, http):
    for u in cluster.decode_urls:
        async with http.post(u + "/_emulator/faults", json={"extra_latency_ms": 3000}) as r:
            assert r.status == 200
    cfg = make_config(cluster.prefill_urls, cluster.decode_urls,
                      server={"port": 0, "timeouts": {"first_byte_s": 0.5}},
                      resilience={"decode_attempts": 1})
    url, _ = await start_pdlb(cfg)
    for stream in (False, True):
        body = {"model": "emulated-model", "prompt": "slow", "max_tokens": 5, "stream": stream}
        assert await outcome(http, url, body) == "error_504"


async def test_decode_drops_connections_mid_stream(cluster, start_pdlb, http):
    for u in cluster.decode_urls:
        async with http.post(u + "/_emulator/faults", json={"drop_after_chunks": 3}) as r:
            assert r.status == 200
    url, _ = await start_pdlb(make_config(cluster.prefill_urls, cluster.decode_urls))
    body = {"model": "emulated-model", "prompt": "drop", "max_tokens": 10, "stream": True}
    results = Counter(await asyncio.gather(*(outcome(http, url, body) for _ in range(6))))
    assert results == Counter({"stream_error": 6}), results


async def test_clients_disconnect_at_random_points(cluster, start_pdlb, http):
    url, app = await start_pdlb(make_config(cluster.prefill_urls, cluster.decode_urls))
    rng = random.Random(5)
    body = {"model": "emulated-model", "prompt": "bye " * 50, "max_tokens": 60, "stream": True}

    async def one() -> str:
        if rng.random() < 0.3:  # gone before the first byte (during prefill or handoff)
            task = asyncio.create_task(outcome(http, url, body))
            await asyncio.sleep(rng.uniform(0.0, 0.05))
            task.cancel()
            try:
                return await task
            except asyncio.CancelledError:
                return "disconnected"
        return await outcome(http, url, body, disconnect_after=rng.randint(1, 70))

    results = Counter(await asyncio.gather(*(one() for _ in range(40))))
    assert set(results) <= GOOD, results
    # every decode server sees its aborted requests end: nothing keeps running
    for u in cluster.decode_urls + cluster.prefill_urls:
        for _ in range(100):
            async with http.get(u + "/_emulator/state") as r:
                s = await r.json()
            if s["running"] == 0 and s["waiting"] == 0:
                break
            await asyncio.sleep(0.05)
        assert s["running"] == 0 and s["waiting"] == 0, (u, s["running"], s["waiting"])


async def test_flood_beyond_capacity_is_pushed_back(cluster, start_pdlb, http):
    cfg = make_config(cluster.prefill_urls, cluster.decode_urls,
                      pools={"decode": {"max_inflight_tokens": 3000, "max_queue": 10,
                                        "queue_timeout_s": 2.0}})
    url, _ = await start_pdlb(cfg)
    body = {"model": "emulated-model", "prompt": "flood " * 100, "max_tokens": 100,
            "stream": True}
    results = Counter(await asyncio.gather(*(outcome(http, url, body) for _ in range(80))))
    assert set(results) <= GOOD, results
    assert results["complete"] >= 10
    assert results["error_429"] + results["error_503"] >= 20, results
