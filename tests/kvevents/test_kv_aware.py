"""``kv_aware`` routing, from the policy's arithmetic to a real pdlb in front of an emulator
fleet that publishes vLLM's KV events: picks follow what the engines hold (including what
another client put there), the decode that holds a prompt serves it alone, predictions
match what the prefill reports, a silent backend falls back to the approximate index, and
two replicas make the same picks."""

from __future__ import annotations

import re
import time
from typing import Any

import aiohttp
import pytest

from lb.backends.kvevents.index import BlockIndex
from lb.backends.kvevents.lookup import PoolKV
from lb.backends.kvevents.subscriber import Health
from lb.backends.kvevents.wire import BlockStored
from lb.serve.app import KV_EVENTS, POOLS, PROXY
from policies.base import RouteRequest
from policies.kv_aware import KVAware
from policies.testing import backends, make_request
from tests.conftest import make_config
from tests.kvevents.test_fleet import (
    BS,
    MODEL,
    complete,
    emulator,
    free_port,
    go_live,
    prompt,
    until,
)

# ----------------------------------------------------------------------------- the policy


def _request(cached: dict[str, int] | None, n: int = 20 * BS + 1, **fields: Any) -> RouteRequest:
    ids = list(range(n))
    base = make_request(prompt_tokens=n, **fields)
    return RouteRequest(**{**{f: getattr(base, f) for f in base.__dataclass_fields__},
                           "prompt_token_ids": ids, "cached_tokens": cached})


def _pool(n: int) -> list[Any]:
    pool = backends(n)
    for i, b in enumerate(pool):
        b.url = f"http://b{i}"
    return pool


def test_picks_the_backend_holding_the_longest_prefix() -> None:
    pool = _pool(3)
    policy = KVAware({})
    cached = {"http://b0": 0, "http://b1": 10 * BS, "http://b2": 18 * BS}
    assert policy.pick(_request(cached), pool) is pool[2]


def test_load_outweighs_a_small_hit_and_the_bound_drops_a_hot_backend() -> None:
    pool = _pool(2)
    policy = KVAware({})
    n = 20 * BS + 1
    # b1 holds 1/20 of the prompt but carries 4 requests' worth more tokens: load wins.
    pool[1].inflight_tokens = 4 * n
    assert policy.pick(_request({"http://b0": 0, "http://b1": BS}, n), pool) is pool[0]
    # b1 holds it all, but is far past the load bound: not a candidate.
    pool[1].inflight_tokens = 50 * n
    assert policy.pick(_request({"http://b0": 0, "http://b1": 20 * BS}, n), pool) is pool[0]


def test_a_backend_without_events_is_scored_by_the_approximate_index() -> None:
    pool = _pool(2)
    policy = KVAware({})
    req = make_request(prompt="shared system prompt " * 40)
    hashes = req.prefix_hashes
    assert hashes
    policy.index.record(hashes, pool[1].index)  # this process sent the prefix to b1
    # b0's events say it holds nothing; b1 has no events (absent): its approximate score wins.
    approx = RouteRequest(**{**{f: getattr(req, f) for f in req.__dataclass_fields__},
                             "prompt_token_ids": list(range(400)),
                             "cached_tokens": {"http://b0": 0}})
    assert policy.pick(approx, pool) is pool[1]
    strict = KVAware({"approximate_fallback": False})
    strict.index.record(hashes, pool[1].index)
    picks = {strict.pick(approx, pool).index for _ in range(4)}
    assert picks == {0, 1}  # no prefix signal at all: ties rotate


def test_pick_direct_needs_the_share_and_respects_the_bound() -> None:
    pool = _pool(2)
    n = 20 * BS + 1
    policy = KVAware({"skip_prefill_share": 0.9})
    assert policy.pick_direct(_request({"http://b0": 10 * BS}, n), pool) is None
    assert policy.pick_direct(_request({"http://b0": 20 * BS}, n), pool) is pool[0]
    assert policy.pick_direct(_request(None, n), pool) is None
    pool[0].inflight_tokens = 50 * n  # the holder is overloaded: the usual P/D path instead
    assert policy.pick_direct(_request({"http://b0": 20 * BS}, n), pool) is None
    assert KVAware({"skip_prefill_share": 0}).pick_direct(
        _request({"http://b1": 20 * BS}, n), pool) is None


def test_options_are_checked() -> None:
    from policies.base import PolicyOptionError
    with pytest.raises(PolicyOptionError, match="skip_prefill_share"):
        KVAware({"skip_prefill_share": 1.5})
    with pytest.raises(PolicyOptionError, match="approximate_fallback"):
        KVAware({"approximate_fallback": "yes"})
    with pytest.raises(PolicyOptionError, match="weights"):
        KVAware({"weights": {"prefix": -1}})


# ----------------------------------------------------------------------------- freshness


def test_a_backend_silent_after_storing_work_is_stale_until_it_speaks() -> None:
    index = BlockIndex()
    health = Health(state="live")
    kv = PoolKV(index, lambda url: health if url == "b" else None, stale_after_s=0.05)
    index.apply("b", [BlockStored(block_hashes=[1], parent_block_hash=None,
                                  token_ids=list(range(BS)), block_size=BS)])
    health.last_event_at = time.monotonic()
    ids = list(range(3 * BS))
    assert kv.cached_tokens(ids) == {"b": BS}
    kv.leg_done("b", prompt_tokens=len(ids), predicted=BS)  # two new blocks: events due
    assert kv.cached_tokens(ids) == {"b": BS}  # within stale_after_s
    time.sleep(0.08)
    assert kv.cached_tokens(ids) == {} and kv.stale("b")
    health.last_event_at = time.monotonic()  # it spoke again
    assert kv.cached_tokens(ids) == {"b": BS} and not kv.stale("b")
    # a leg that stored nothing new (the prompt was cached) expects no event
    kv.leg_done("b", prompt_tokens=BS + 1, predicted=BS)
    time.sleep(0.08)
    assert kv.fresh("b")
    health.state = "resyncing"
    assert kv.cached_tokens(ids) == {}


# ----------------------------------------------------------------------------- through pdlb


async def _metric(http: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _hits(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    m = re.search(r"^vllm:prefix_cache_hits_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _kv_config(prefill_urls: list[str], decode_urls: list[str], **pools: Any) -> Any:
    return make_config(prefill_urls, decode_urls, kv_events={"enabled": True},
                       tokenizer={"kind": "emulator"}, pools=pools)


async def test_routes_to_where_another_client_cached_the_prefix(start_pdlb: Any) -> None:
    """A prompt prefilled on one backend by a client that never went through pdlb: the
    approximate index cannot know, the events do — every later request with that prefix
    lands there, and the cached tokens pdlb predicted are the ones the prefill reports."""
    async with emulator("prefill", free_port()) as p1, emulator("prefill", free_port()) as p2, \
            emulator("decode", None) as d:
        url, app = await start_pdlb(_kv_config([p1.url, p2.url], [d.url],
                                               prefill={"policy": "kv_aware"}))
        events = app[KV_EVENTS]
        assert events is not None
        async with aiohttp.ClientSession() as http:
            for backend in (p1.url, p2.url):
                await go_live(http, url, events, "prefill", backend)
            shared = prompt(3)
            await complete(http, p2.url, shared)  # straight to p2: another client
            index = events.index("prefill")
            await until(lambda: index.longest_prefix(shared).get(p2.url) == 20 * BS,
                        "p2's blocks of the shared prefix indexed")
            before = (await _hits(http, p1.url), await _hits(http, p2.url))
            for i in range(6):
                await complete(http, url, shared + [1000 + i] * 3)
            after = (await _hits(http, p1.url), await _hits(http, p2.url))
            assert after[0] == before[0], "p1 never saw the prefix"
            assert after[1] - before[1] == 6 * 20 * BS
            assert await _metric(http, url, "pdlb_kv_route_picks_total", pool="prefill",
                                 source="events") >= 6
            assert await _metric(http, url, "pdlb_kv_predictions_total", outcome="exact") >= 6
            assert await _metric(http, url, "pdlb_kv_predictions_total", outcome="over") == 0
            assert await _metric(http, url, "pdlb_kv_predictions_total", outcome="under") == 0


async def test_a_decode_that_holds_the_prompt_serves_it_alone(start_pdlb: Any) -> None:
    """After a P/D request the decode holds the prompt's KV (it pulled it); the same prompt
    again skips the prefill hop and goes to that decode, which reports it cached."""
    async with emulator("prefill", free_port()) as p, emulator("decode", free_port()) as d1, \
            emulator("decode", free_port()) as d2:
        url, app = await start_pdlb(_kv_config(
            [p.url], [d1.url, d2.url], prefill={"policy": "kv_aware"},
            decode={"policy": "kv_aware", "policy_options": {"skip_prefill_share": 0.9}}))
        events = app[KV_EVENTS]
        assert events is not None
        async with aiohttp.ClientSession() as http:
            for pool, backend in (("prefill", p.url), ("decode", d1.url), ("decode", d2.url)):
                await go_live(http, url, events, pool, backend)
            long = prompt(5)
            first = await complete(http, url, long)
            index = events.index("decode")
            await until(lambda: max(index.longest_prefix(long).values(), default=0) == 20 * BS,
                        "the decode's pulled blocks indexed")
            holder = next(u for u, n in index.longest_prefix(long).items() if n)
            prefills = await _metric(http, url, "pdlb_prefill_duration_seconds_count")
            second = await complete(http, url, long)
            assert await _metric(http, url, "pdlb_kv_skipped_prefill_total") == 1
            assert await _metric(http, url, "pdlb_prefill_duration_seconds_count") == prefills
            assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 20 * BS
            assert second["choices"][0]["text"] == first["choices"][0]["text"]
            assert await _hits(http, holder) >= 20 * BS


async def test_two_replicas_make_the_same_picks(start_pdlb: Any) -> None:
    """Two pdlb apps on one fleet, both kv_aware: after the engines cached different
    prefixes (through neither of them), both route each prefix to the same backend."""
    async with emulator("prefill", free_port()) as p1, emulator("prefill", free_port()) as p2, \
            emulator("prefill", free_port()) as p3, emulator("decode", None) as d:
        urls = [p1.url, p2.url, p3.url]
        config = _kv_config(urls, [d.url], prefill={"policy": "kv_aware"})
        url_a, app_a = await start_pdlb(config)
        url_b, app_b = await start_pdlb(config)
        async with aiohttp.ClientSession() as http:
            for app, url in ((app_a, url_a), (app_b, url_b)):
                events = app[KV_EVENTS]
                assert events is not None
                for backend in urls:
                    await go_live(http, url, events, "prefill", backend)
            prefixes = [prompt(40 + i) for i in range(6)]
            for i, prefix in enumerate(prefixes):
                await complete(http, urls[i % 3], prefix)

            def indexed() -> bool:
                return all(max(app[KV_EVENTS].index("prefill").longest_prefix(x).values())
                           == 20 * BS for app in (app_a, app_b) for x in prefixes)

            await until(indexed, "both replicas indexed every prefix")
            for i, prefix in enumerate(prefixes):
                picks = []
                for app in (app_a, app_b):
                    proxy = app[PROXY]
                    route = proxy.kv.for_leg(RouteRequest(**_route_fields(prefix)), "prefill")
                    picks.append(app[POOLS]["prefill"].pick(route).url)
                assert picks == [urls[i % 3]] * 2


def _route_fields(ids: list[int]) -> dict[str, Any]:
    return {"request_id": "r", "leg": "prefill", "endpoint": "completions", "model": MODEL,
            "prompt_tokens": len(ids), "max_tokens": 2, "session_key": None,
            "prompt_token_ids": ids}


async def test_two_pdlb_processes_see_the_same_cached_tokens(tmp_path: Any) -> None:
    """Two real pdlb processes (each its own PYTHONHASHSEED) subscribed to one emulator
    fleet: for every prompt, /admin/kv/lookup gives the same numbers in both — the index's
    keys are pdlb's own hash of the token ids, the same in every process."""
    import asyncio
    import os
    import subprocess
    import sys

    async with emulator("prefill", free_port()) as p1, emulator("prefill", free_port()) as p2, \
            emulator("decode", None) as d:
        cfg = tmp_path / "backends.toml"
        cfg.write_text(f'[pools.prefill]\nbackends = ["{p1.url}", "{p2.url}"]\n'
                       'policy = "kv_aware"\n'
                       f'[pools.decode]\nbackends = ["{d.url}"]\n'
                       '[tokenizer]\nkind = "emulator"\n[kv_events]\nenabled = true\n'
                       '[admin]\nenabled = true\ntoken = "t"\n'
                       '[health]\ninterval_s = 0.2\ntimeout_s = 0.5\n')
        procs, urls = [], []
        try:
            for seed in ("1", "2"):
                proc = subprocess.Popen(  # noqa: ASYNC220 - started once, read in a thread
                    [sys.executable, "-m", "lb.cli", "serve", "--config", str(cfg),
                     "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    text=True, env={**os.environ, "PYTHONHASHSEED": seed})
                procs.append(proc)
                assert proc.stdout is not None
                line = await asyncio.to_thread(proc.stdout.readline)
                found = re.search(r"listening on (http://\S+)", line)
                assert found, line
                urls.append(found.group(1))
            auth = {"Authorization": "Bearer t"}
            prefixes = [prompt(60 + i) for i in range(4)]
            async with aiohttp.ClientSession(headers=auth) as http:
                for url in urls:  # the ZMQ slow joiner: until both processes hear both
                    for i in range(200):
                        await complete(http, url, [9, 200 + i] * BS)
                        async with http.get(url + "/admin/state") as r:
                            state = await r.json()
                        live = [b["kv_events"]["state"] == "live"
                                for b in state["pools"]["prefill"]["backends"]]
                        if all(live):
                            break
                        await asyncio.sleep(0.05)
                    else:
                        raise AssertionError(f"{url} never heard both prefills")
                for i, prefix in enumerate(prefixes):
                    await complete(http, (p1.url, p2.url)[i % 2], prefix)

                async def lookups() -> list[list[Any]]:
                    out = []
                    for url in urls:
                        answers = []
                        for prefix in prefixes:
                            async with http.post(url + "/admin/kv/lookup",
                                                 json={"model": MODEL, "prompt": prefix}) as r:
                                assert r.status == 200
                                answers.append((await r.json())["pools"]["prefill"])
                        out.append(answers)
                    return out

                for _ in range(100):
                    a, b = await lookups()
                    if a == b and all(max(x.values()) == 20 * BS for x in a):
                        break
                    await asyncio.sleep(0.05)
                assert a == b
                assert [max(x, key=lambda u: x[u] or 0) for x in a] == \
                    [(p1.url, p2.url)[i % 2] for i in range(len(prefixes))]
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)
                if proc.stdout is not None:
                    proc.stdout.close()
