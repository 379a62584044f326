"""Tenants' limits across two pdlb replicas sharing one real redis-server: the requests
window, the tokens window and the in-flight count hold for the pair, exactly; with Redis
gone each replica enforces its share (limit / replicas) and serves on."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp

from emulator import EmulatorConfig, EmulatorServer
from tests.cluster.redis_server import RedisServer
from tests.conftest import make_config

PROMPT = "Fair shares across a fleet of replicas. " * 4


async def post(http: aiohttp.ClientSession, url: str, key: str, max_tokens: int
               ) -> tuple[int, dict[str, str]]:
    body = {"model": "emulated-model", "prompt": PROMPT, "max_tokens": max_tokens}
    async with http.post(url + "/v1/completions", json=body,
                         headers={"Authorization": f"Bearer {key}"}) as r:
        await r.read()
        return r.status, {k.lower(): v for k, v in r.headers.items()}


async def test_limits_are_global_across_replicas(redis_server: RedisServer,
                                                 start_pdlb: Any) -> None:
    async with EmulatorServer(EmulatorConfig(role="prefill", time_scale=20.0)) as p, \
            EmulatorServer(EmulatorConfig(role="decode", time_scale=20.0)) as d:
        config = make_config([p.url], [d.url], tokenizer={"kind": "emulator"},
                             cluster={"redis_url": redis_server.url, "replicas": 2,
                                      "timeout_ms": 300.0},
                             tenants={
                                 "rps": {"api_keys": ["k-rps"], "requests": 4,
                                         "requests_window_s": 30.0},
                                 "tok": {"api_keys": ["k-tok"], "tokens": 600,
                                         "tokens_window_s": 30.0},
                                 "one": {"api_keys": ["k-one"], "concurrent": 2}})
        a, _ = await start_pdlb(config)
        b, _ = await start_pdlb(config)
        async with aiohttp.ClientSession() as http:
            # 5 + 5 requests at once through two replicas against 4 per window: exactly 4.
            answers = await asyncio.gather(*(post(http, url, "k-rps", 2)
                                             for url in [a, b] * 5))
            assert Counter(s for s, _ in answers) == {200: 4, 429: 6}
            assert sorted(h["x-ratelimit-remaining-requests"] for s, h in answers
                          if s == 200) == ["0", "1", "2", "3"]
            refused = next(h for s, h in answers if s == 429)
            assert refused["x-pdlb-reject-reason"] == "requests"
            assert 28 <= int(refused["retry-after"]) <= 30

            # tokens: ~50 + 100 each against 600 for the pair, whichever replica takes them
            answers = [await post(http, url, "k-tok", 100) for url in [a, b] * 3]
            statuses = [s for s, _ in answers]
            assert statuses[:3] == [200, 200, 200] and statuses[-1] == 429
            assert int(answers[1][1]["x-ratelimit-remaining-tokens"]) < int(
                answers[0][1]["x-ratelimit-remaining-tokens"])

            # in flight: 2 for the pair; long answers overlap, the third is refused
            answers = await asyncio.gather(*(post(http, url, "k-one", 400)
                                             for url in (a, b, a)))
            assert Counter(s for s, _ in answers) == {200: 2, 429: 1}
            assert next(h for s, h in answers if s == 429)["x-pdlb-reject-reason"] \
                == "concurrent"
            await asyncio.sleep(0.2)  # the finishes are sent off the request path
            answers = await asyncio.gather(*(post(http, url, "k-one", 4) for url in (a, b)))
            assert [s for s, _ in answers] == [200, 200]  # both slots came back

            # Redis gone: each replica enforces 4 / 2 = 2 on its own, and serves on.
            redis_server.stop()
            await post(http, a, "k-rps", 2)  # the first call finds Redis down
            await asyncio.sleep(0.1)
            local = [await post(http, a, "k-rps", 2) for _ in range(3)]
            assert [s for s, _ in local][-1] == 429
            assert local[0][1]["x-ratelimit-limit-requests"] == "2"


async def test_shared_budget_line_is_fair(redis_server: RedisServer) -> None:
    """With [cluster] budgets, a replica's line for the shared budget is the fair one: 4 of
    `big` waiting, then 1 of `small`, then 1 interactive of `app` over batch ones: small is
    admitted second overall, and a full line sheds big's newest for another arrival."""
    from lb.admission import Admission
    from lb.backends.cluster import RedisBudgets
    from lb.config import ClusterConfig
    from lb.errors import Overloaded
    from lb.metrics import Metrics
    from lb.tenants.fairqueue import Flow

    config = make_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"], pools={
        "decode": {"max_inflight_tokens": 100, "max_queue": 5, "queue_timeout_s": 5.0}},
        tenants={"big": {}, "small": {}})
    metrics = Metrics()
    store = RedisBudgets(ClusterConfig(redis_url=redis_server.url, poll_ms=10.0), metrics)
    await store.start()
    try:
        a = Admission(config.pools, metrics, store, config.tenancy)
        first = await a.admit(0, 100, Flow("big"))
        order: list[str] = []

        async def one(name: str, flow: Flow) -> str:
            try:
                with await a.admit(0, 100, flow):
                    order.append(name)
                    await asyncio.sleep(0.02)
                return "ok"
            except Overloaded as exc:
                return exc.reason

        async def queued(count: int) -> None:
            """Wait (bounded) until ``count`` requests wait in the line: each arrival is in
            it before the next starts, so the line's order is the tasks' (under load, two
            that both found the line empty asked Redis at once and queued in either order)."""
            for _ in range(500):
                if a._stages["decode"].waiting == count:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"{count} waiting expected, {a._stages['decode'].waiting}")

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(one(f"b{i}", Flow("big"))))
            await queued(i + 1)
        tasks.append(asyncio.create_task(one("s0", Flow("small"))))  # full: sheds b4
        await asyncio.sleep(0.05)
        first.release()
        results = await asyncio.gather(*tasks)
        assert results == ["ok", "ok", "ok", "ok", "shed", "ok"]
        assert order == ["b0", "s0", "b1", "b2", "b3"]
        await asyncio.sleep(0.1)
        assert a.admitted_tokens("decode") == 0
    finally:
        await store.stop()
