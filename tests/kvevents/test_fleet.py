"""An emulator fleet publishing KV events, through a real pdlb with ``[kv_events]`` on: the
endpoints found through ``/kv_event_sources``, a long prompt's blocks in the prefill pool's
index, a backend restarted mid-run, metrics and /admin/state, and a fleet whose endpoint
never answers. Everything runs on loopback; loops are bounded, nothing is timed."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import aiohttp

from emulator import EmulatorConfig, EmulatorServer
from lb.backends.kvevents import KVEvents
from lb.serve.app import KV_EVENTS, POOLS
from tests.conftest import make_config

BS = 16
MODEL = "emulated-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def emulator(role: str, events_port: int | None, port: int = 0) -> EmulatorServer:
    endpoint = None if events_port is None else f"tcp://*:{events_port}"
    return EmulatorServer(EmulatorConfig(role=role, time_scale=50.0, seed=7, block_size=BS,
                                         kv_events_endpoint=endpoint), port=port)


async def until(check: Callable[[], bool], what: str, tries: int = 500) -> None:
    for _ in range(tries):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


async def complete(http: aiohttp.ClientSession, url: str, prompt: list[int]) -> dict[str, Any]:
    async with http.post(url + "/v1/completions",
                         json={"model": MODEL, "prompt": prompt, "max_tokens": 2}) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def go_live(http: aiohttp.ClientSession, url: str, events: KVEvents, pool: str,
                  backend: str) -> None:
    """Send short distinct prompts until the backend's events are heard (the ZMQ slow
    joiner loses what is published before the subscription arrives)."""
    for i in range(200):
        await complete(http, url, [7, 100 + i] * BS)
        await asyncio.sleep(0.02)
        if events.health(pool, backend)["state"] == "live":
            return
    raise AssertionError(f"{backend}'s events never arrived")


def prompt(seed: int, n: int = 20 * BS + 5) -> list[int]:
    return [(seed * 7919 + i * 31) % 9000 + 10 for i in range(n)]


async def test_long_prompt_lands_in_the_prefill_index(start_pdlb: Any) -> None:
    """After a long prompt is served, the prefill pool's index holds its full blocks for
    the backend that prefilled it; metrics and /admin/state show the stream's health."""
    async with emulator("prefill", free_port()) as p, emulator("decode", free_port()) as d:
        config = make_config([p.url], [d.url], kv_events={"enabled": True},
                             admin={"enabled": True, "token": "t"})
        url, app = await start_pdlb(config)
        events = app[KV_EVENTS]
        assert events is not None
        index = app[POOLS]["prefill"].kv.index
        assert index is not None and index is events.index("prefill")
        async with aiohttp.ClientSession() as http:
            await go_live(http, url, events, "prefill", p.url)
            long = prompt(1)
            await complete(http, url, long)
            await until(lambda: index.longest_prefix(long).get(p.url) == 20 * BS,
                        "the long prompt's 20 blocks indexed")
            assert index.longest_prefix(prompt(2)) == {p.url: 0}
            async with http.get(url + "/metrics") as r:
                text = await r.text()
            assert f'pdlb_kv_index_blocks{{backend="{p.url}",pool="prefill"}}' in text
            assert f'pdlb_kv_events_state{{backend="{p.url}",pool="prefill",state="live"}} 1.0' \
                in text
            async with http.get(url + "/admin/state",
                                headers={"Authorization": "Bearer t"}) as r:
                state = await r.json()
            health = state["pools"]["prefill"]["backends"][0]["kv_events"]
            assert health["state"] == "live" and health["blocks"] >= 20
            port = str(p.config.kv_events_endpoint).rsplit(":", 1)[1]
            assert health["endpoints"] == [f"tcp://127.0.0.1:{port}"]  # * → the backend's host


async def test_restarted_backend_loses_its_entries(start_pdlb: Any) -> None:
    """A prefill restarted mid-run: its old blocks leave the index (ejected while down, and
    the new engine's sequence starts again), its new ones arrive."""
    events_port, http_port = free_port(), free_port()
    async with emulator("decode", None) as d:
        p = emulator("prefill", events_port, http_port)
        await p.__aenter__()
        try:
            url, app = await start_pdlb(make_config([p.url], [d.url],
                                                    kv_events={"enabled": True}))
            events = app[KV_EVENTS]
            assert events is not None
            index = events.index("prefill")
            async with aiohttp.ClientSession() as http:
                await go_live(http, url, events, "prefill", p.url)
                old = prompt(3)
                await complete(http, url, old)
                await until(lambda: index.longest_prefix(old).get(p.url) == 20 * BS, "indexed")
                await p.__aexit__(None, None, None)
                await until(lambda: p.url not in index.longest_prefix(old),
                            "the stopped backend forgotten")
                p = emulator("prefill", events_port, http_port)
                await p.__aenter__()
                await until(lambda: app[POOLS]["prefill"].backends[0].healthy, "back in rotation")
                await go_live(http, url, events, "prefill", p.url)
                new = prompt(4)
                await complete(http, url, new)
                await until(lambda: index.longest_prefix(new).get(p.url) == 20 * BS, "new blocks")
                assert index.longest_prefix(old)[p.url] == 0
        finally:
            await p.__aexit__(None, None, None)


async def test_endpoint_that_never_answers_blocks_nothing(start_pdlb: Any) -> None:
    """Configured endpoints where nobody publishes: requests are served, the backends stay
    unknown (absent from lookups), shutdown is prompt."""
    async with emulator("prefill", None) as p, emulator("decode", None) as d:
        silent = {p.url: {"endpoint": f"tcp://127.0.0.1:{free_port()}"},
                  d.url: {"endpoint": f"tcp://127.0.0.1:{free_port()}"}}
        url, app = await start_pdlb(make_config(
            [p.url], [d.url], kv_events={"enabled": True, "backends": silent}))
        events = app[KV_EVENTS]
        assert events is not None
        async with aiohttp.ClientSession() as http:
            for i in range(3):
                await complete(http, url, prompt(10 + i))
        assert events.pool("prefill").cached_tokens(prompt(10)) == {}
        assert events.health("prefill", p.url)["state"] == "unknown"


async def test_backend_without_events_is_discovered_as_none(start_pdlb: Any) -> None:
    """A backend whose /kv_event_sources answers {} (events off): no subscriber, no crash."""
    async with emulator("prefill", None) as p, emulator("decode", None) as d:
        url, app = await start_pdlb(make_config([p.url], [d.url], kv_events={"enabled": True}))
        events = app[KV_EVENTS]
        assert events is not None
        async with aiohttp.ClientSession() as http:
            await complete(http, url, prompt(20))
        await until(lambda: events.health("prefill", p.url)["state"] == "no_source",
                    "discovery answered: no events")
        assert events.pool("prefill").cached_tokens(prompt(20)) == {}


async def test_reload_follows_added_and_removed_backends(tmp_path: Any) -> None:
    """A hot reload subscribes to an added backend and stops (and forgets) a removed one."""
    from lb.config import load_config
    from lb.serve.app import RELOAD
    from lb.serve.server import start_site

    def write(prefill: str, decode: str) -> None:
        path.write_text(f'[pools.prefill]\nbackends = ["{prefill}"]\n'
                        f'[pools.decode]\nbackends = ["{decode}"]\n'
                        '[server]\nport = 0\n[health]\ninterval_s = 0.2\ntimeout_s = 0.5\n'
                        '[kv_events]\nenabled = true\n')

    path = tmp_path / "backends.toml"
    async with emulator("prefill", free_port()) as p1, emulator("prefill", free_port()) as p2, \
            emulator("decode", None) as d:
        write(p1.url, d.url)
        runner, url = await start_site(load_config(path), drain_s=1.0,
                                       reloader=lambda: load_config(path))
        try:
            events = runner.app[KV_EVENTS]
            assert events is not None
            async with aiohttp.ClientSession() as http:
                await go_live(http, url, events, "prefill", p1.url)
                write(p2.url, d.url)
                report = runner.app[RELOAD]()
                assert report["pools"]["prefill"]["added"] == [p2.url]
                added = runner.app[POOLS]["prefill"].backends[0]
                await until(lambda: added.healthy, "the added backend's first health check")
                await go_live(http, url, events, "prefill", p2.url)
            assert ("prefill", p1.url) not in events.subscribers
            assert not events.index("prefill").known(p1.url)
        finally:
            await runner.cleanup()


async def test_two_replicas_build_the_same_index(start_pdlb: Any) -> None:
    """Two pdlb processes' worth of apps on one fleet: the same keys, the same answers (the
    keys are pdlb's own hash of the tokens, never vLLM's seeded hashes)."""
    async with emulator("prefill", free_port()) as p1, emulator("prefill", free_port()) as p2, \
            emulator("decode", None) as d:
        config = make_config([p1.url, p2.url], [d.url], kv_events={"enabled": True},
                             pools={"prefill": {"policy": "round_robin"}})
        url_a, app_a = await start_pdlb(config)
        _, app_b = await start_pdlb(config)
        a, b = app_a[KV_EVENTS], app_b[KV_EVENTS]
        assert a is not None and b is not None
        async with aiohttp.ClientSession() as http:
            for backend in (p1.url, p2.url):
                for events in (a, b):
                    await go_live(http, url_a, events, "prefill", backend)
            prompts = [prompt(30 + i) for i in range(4)]
            for each in prompts:
                await complete(http, url_a, each)

            def same() -> bool:
                answers = [(a.pool("prefill").cached_tokens(x), b.pool("prefill").cached_tokens(x))
                           for x in prompts]
                return all(x == y and max(x.values()) == 20 * BS for x, y in answers)

            await until(same, "both replicas see every prompt where it was prefilled")
        assert a.index("prefill").snapshot() == b.index("prefill").snapshot()
