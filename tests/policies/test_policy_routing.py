"""Through a real pdlb and emulated vLLM servers: pdlb computes prefix hashes for a policy
that asks, and prefix_affinity turns them into prefix-cache hits that round_robin misses."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from emulator import EmulatorConfig, EmulatorServer
from tests.conftest import make_config

GROUPS = [f"System prompt {g}: you are a meticulous assistant for team {g}. " * 12
          for g in range(3)]


@pytest.fixture
async def servers() -> AsyncIterator[list[EmulatorServer]]:
    started = [EmulatorServer(EmulatorConfig(role=role, time_scale=50.0))
               for role in ("prefill",) * 4 + ("decode",)]
    for server in started:
        await server.start()
    try:
        yield started
    finally:
        for server in started:
            await server.stop()


async def cache_counters(http: aiohttp.ClientSession, urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for url in urls:
        async with http.get(url + "/metrics") as resp:
            for line in (await resp.text()).splitlines():
                if line.startswith("vllm:prefix_cache_hits_total"):
                    hits += float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllm:prefix_cache_queries_total"):
                    queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


@pytest.mark.parametrize("policy, chat", [("round_robin", False), ("prefix_affinity", False),
                                          ("prefix_affinity", True)])
async def test_prefix_affinity_hits_the_cache_round_robin_misses(servers, start_pdlb, policy,
                                                                  chat):
    """Three groups of four prompts sharing a system prompt, sent one after another,
    interleaved: prefix_affinity keeps each group on one prefill server (cache hits on
    3 of 4 prompts); round_robin spreads every group over all four (no hits)."""
    prefill = [s.url for s in servers[:4]]
    config = make_config(prefill, [servers[4].url], pools={"prefill": {"policy": policy}})
    url, app = await start_pdlb(config)
    async with aiohttp.ClientSession() as http:
        before = await cache_counters(http, prefill)
        for i in range(4):
            for system in GROUPS:
                question = f"Question {i}: summarise item {i * 7} in one line."
                body = ({"messages": [{"role": "system", "content": system},
                                      {"role": "user", "content": question}]}
                        if chat else {"prompt": system + question})
                path = "/v1/chat/completions" if chat else "/v1/completions"
                async with http.post(url + path, json={"model": "emulated-model",
                                                       "max_tokens": 4, **body}) as resp:
                    assert resp.status == 200, await resp.text()
        after = await cache_counters(http, prefill)
    hit_rate = (after[0] - before[0]) / (after[1] - before[1])
    if policy == "round_robin":
        assert hit_rate < 0.1, hit_rate
    else:
        assert hit_rate > 0.6, hit_rate
        per_server = [s.engine.counters.requests_total for s in servers[:4]]
        assert sorted(per_server) == [0, 4, 4, 4], per_server


class Recording:
    """Remembers the prefix hashes of every request it routes."""

    def __init__(self, wants: bool) -> None:
        self.wants_prefix_hashes = wants
        self.seen: list[tuple[int, ...]] = []

    def pick(self, request, candidates):
        self.seen.append(request.prefix_hashes)
        return candidates[0]


async def test_prefix_hashes_follow_the_policies_after_a_reload(servers, start_pdlb):
    """pdlb asks the pools' current policies (Policy.wants_prefix_hashes) on every request,
    so a reload that brings in a prefix-aware policy gets hashes, and one that removes it
    stops the hashing."""
    from lb.serve.app import POOLS

    config = make_config([servers[0].url], [servers[4].url])
    url, app = await start_pdlb(config)
    pools = app[POOLS]
    body = {"model": "emulated-model", "max_tokens": 2, "prompt": GROUPS[0] + "hi"}
    async with aiohttp.ClientSession() as http:
        for wants in (False, True, False):
            policy = Recording(wants)
            pools["prefill"].replace_backends(pools["prefill"].config, policy)  # as a reload
            async with http.post(url + "/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
            assert len(policy.seen) == 1 and bool(policy.seen[0]) is wants
