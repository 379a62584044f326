"""An emulator fleet under cache pressure and lost messages, through a real pdlb routing with
``kv_aware``: evicted blocks leave the index and predictions stay exact; a gap with no
replay drops the backend and the index rebuilds from the events that follow; a gap the
publisher's replay endpoint covers loses nothing."""

from __future__ import annotations

from typing import Any

import aiohttp

from emulator import EmulatorConfig, EmulatorServer
from lb.serve.app import KV_EVENTS
from tests.conftest import make_config
from tests.kvevents.test_fleet import BS, complete, emulator, free_port, go_live, prompt, until
from tests.kvevents.test_kv_aware import _metric


def _small(events_port: int, blocks: int, replay_port: int | None = None) -> EmulatorServer:
    return EmulatorServer(EmulatorConfig(
        role="prefill", time_scale=50.0, seed=7, block_size=BS,
        kv_capacity_tokens=blocks * BS, max_model_len=min(blocks * BS, 8192),
        kv_events_endpoint=f"tcp://*:{events_port}",
        kv_events_replay_endpoint=None if replay_port is None else f"tcp://*:{replay_port}"))


def _config(p: str, d: str) -> Any:
    return make_config([p], [d], kv_events={"enabled": True}, tokenizer={"kind": "emulator"},
                       pools={"prefill": {"policy": "kv_aware"}})


async def test_evictions_leave_the_index_and_predictions_stay_exact(start_pdlb: Any) -> None:
    """A cache of 48 blocks and prompts of 20: the third prompt evicts the first one's
    blocks. The index follows every BlockRemoved, so what pdlb predicts for a repeat of the
    evicted prompt (and of a resident one) is what the prefill then reports."""
    async with _small(free_port(), 48) as p, emulator("decode", None) as d:
        url, app = await start_pdlb(_config(p.url, d.url))
        events = app[KV_EVENTS]
        assert events is not None
        index = events.index("prefill")
        async with aiohttp.ClientSession() as http:
            await go_live(http, url, events, "prefill", p.url)
            a, b, c = prompt(11), prompt(12), prompt(13)
            for each in (a, b, c):
                await complete(http, url, each)
            await until(lambda: index.longest_prefix(c).get(p.url) == 20 * BS, "c indexed")
            assert index.longest_prefix(a)[p.url] < 20 * BS, "a (least recent) was evicted"
            assert events.health("prefill", p.url)["blocks"] <= 48
            before = await _metric(http, url, "pdlb_kv_predictions_total", outcome="exact")
            await complete(http, url, c)
            await complete(http, url, a)
            assert await _metric(http, url, "pdlb_kv_predictions_total",
                                 outcome="exact") == before + 2
            for outcome in ("over", "under"):
                assert await _metric(http, url, "pdlb_kv_predictions_total",
                                     outcome=outcome) == 0


async def test_a_gap_without_replay_drops_the_backend_and_rebuilds(start_pdlb: Any) -> None:
    """The publisher skips sequence numbers (messages lost for good): pdlb counts the gap,
    forgets what it knew of the backend (it may have missed removals), and indexes what
    follows."""
    async with emulator("prefill", free_port()) as p, emulator("decode", None) as d:
        url, app = await start_pdlb(_config(p.url, d.url))
        events = app[KV_EVENTS]
        assert events is not None
        index = events.index("prefill")
        async with aiohttp.ClientSession() as http:
            await go_live(http, url, events, "prefill", p.url)
            old = prompt(21)
            await complete(http, url, old)
            await until(lambda: index.longest_prefix(old).get(p.url) == 20 * BS, "indexed")
            publisher = p.engine.prefix_cache.publisher
            assert publisher is not None
            publisher.skip_next = 3
            new = prompt(22)
            await complete(http, url, new)
            await until(lambda: events.health("prefill", p.url)["gaps"] == 1, "gap seen")
            await until(lambda: index.longest_prefix(new).get(p.url) == 20 * BS,
                        "the batch after the gap indexed")
            assert index.longest_prefix(old)[p.url] == 0, "entries before the gap dropped"
            assert await _metric(http, url, "pdlb_kv_events_gaps_total") == 1


async def test_a_gap_the_replay_covers_loses_nothing(start_pdlb: Any) -> None:
    """One batch buffered but never sent: pdlb asks the replay endpoint (discovered from
    /kv_event_sources) for it and keeps the whole index."""
    async with _small(free_port(), 10_000, replay_port=free_port()) as p, \
            emulator("decode", None) as d:
        url, app = await start_pdlb(_config(p.url, d.url))
        events = app[KV_EVENTS]
        assert events is not None
        index = events.index("prefill")
        async with aiohttp.ClientSession() as http:
            await go_live(http, url, events, "prefill", p.url)
            publisher = p.engine.prefix_cache.publisher
            assert publisher is not None
            lost, after = prompt(31), prompt(32)
            publisher.drop_next = 1
            await complete(http, url, lost)
            await complete(http, url, after)
            await until(lambda: events.health("prefill", p.url)["replays"] == 1, "replayed")
            await until(lambda: index.longest_prefix(after).get(p.url) == 20 * BS, "after")
            assert index.longest_prefix(lost)[p.url] == 20 * BS, "the lost batch replayed"
            assert events.health("prefill", p.url)["gaps"] == 1
