"""Every backend's event stream, one block index per pool, kept in step with the pools.

:class:`KVEvents` is what the app holds: it finds each backend's endpoints (its own
``GET /kv_event_sources``, as vLLM answers it, or the ones written in backends.toml), runs one
:class:`Subscriber` per backend, follows hot reloads (new backends subscribed, removed ones
stopped and forgotten) and ejections (entries dropped at once), and answers a future
request path's one question through each pool's :class:`PoolKV` (:meth:`KVEvents.pool`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import zmq.asyncio
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from lb.backends.kvevents.index import BlockIndex
from lb.backends.kvevents.lookup import PoolKV
from lb.backends.kvevents.subscriber import Endpoint, Health, Subscriber
from lb.backends.pool import Backend
from lb.config import KVEventsConfig

log = logging.getLogger("pdlb.kvevents")

GetJson = Callable[[str], Awaitable[Any]]
_WILDCARDS = ("*", "0.0.0.0", "::", "[::]", "")


def _with_host(endpoint: str, host: str) -> str:
    """``tcp://*:5557`` → ``tcp://HOST:5557`` (vLLM's config names its own bind address)."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    hostport = endpoint[len("tcp://"):]
    bind_host, _, port = hostport.rpartition(":")
    if bind_host in _WILDCARDS:
        bind_host = f"[{host}]" if ":" in host else host
    return f"tcp://{bind_host}:{port}"


def _offset(endpoint: str, rank: int) -> str:
    """vLLM's ``offset_endpoint_port``: DP rank r publishes on the base port + r."""
    if rank == 0 or not endpoint.startswith("tcp://"):
        return endpoint
    base, _, port = endpoint.rpartition(":")
    return f"{base}:{int(port) + rank}" if port.isdigit() else endpoint


def parse_sources(answer: Any, backend_url: str) -> list[Endpoint]:
    """Endpoints from a ``/kv_event_sources`` answer: one per DP rank with zmq events on."""
    if not isinstance(answer, dict):
        return []
    host = urlsplit(backend_url).hostname or "127.0.0.1"
    out = []
    ranks = sorted(answer.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)
    base = None
    for rank_key, source in ranks:
        if not isinstance(source, dict) or not source.get("enable_kv_cache_events"):
            continue
        if source.get("publisher", "zmq") != "zmq" or not isinstance(source.get("endpoint"), str):
            continue
        rank = int(rank_key) if str(rank_key).isdigit() else 0
        endpoint = source["endpoint"]
        replay = source.get("replay_endpoint")
        if base is None:
            base = endpoint
        elif endpoint == base:  # the config as written, not yet offset per rank
            endpoint = _offset(endpoint, rank)
            replay = _offset(replay, rank) if isinstance(replay, str) else None
        out.append(Endpoint(
            endpoint=_with_host(endpoint, host),
            replay_endpoint=_with_host(replay, host) if isinstance(replay, str) else None,
            topic=str(source.get("topic") or ""),
        ))
    return out


class KVEvents:
    """The subscribers of both pools and their indexes."""

    def __init__(self, config: KVEventsConfig, get_json: GetJson,
                 discover_interval_s: float = 5.0) -> None:
        self.config = config
        self._get_json = get_json
        self._discover_interval_s = discover_interval_s
        self.eject_check_s = 0.25
        self.indexes: dict[str, BlockIndex] = {}
        self.pools: dict[str, PoolKV] = {}
        self.subscribers: dict[tuple[str, str], Subscriber] = {}
        self._starting: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._pending: dict[tuple[str, str], Health] = {}
        self._ctx: zmq.asyncio.Context | None = None
        self._followed: dict[str, list[Backend]] = {}
        self._ejected: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch_task: asyncio.Task[None] | None = None

    def index(self, pool: str) -> BlockIndex:
        if pool not in self.indexes:
            self.indexes[pool] = BlockIndex(self.config.max_blocks)
        return self.indexes[pool]

    def pool(self, name: str) -> PoolKV:
        """The pool's index as the request path asks it: fresh backends only."""
        if name not in self.pools:
            def health_of(url: str) -> Health | None:
                sub = self.subscribers.get((name, url))
                return None if sub is None else sub.health
            self.pools[name] = PoolKV(self.index(name), health_of, self.config.stale_after_s)
        return self.pools[name]

    def follow(self, pools: Mapping[str, Iterable[Backend]]) -> None:
        """Follow these pools' backends (at start and after each hot reload): subscribe to
        new ones, stop removed ones, and drop an ejected backend's entries when the health
        checker takes it out (checked every ``eject_check_s``)."""
        self._followed = {name: list(backends) for name, backends in pools.items()}
        task = asyncio.create_task(self.sync({name: [b.url for b in bs]
                                              for name, bs in self._followed.items()}))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._watch_task is None:
            self._watch_task = asyncio.create_task(self._watch_ejections(),
                                                   name="pdlb-kvevents-ejections")

    async def _watch_ejections(self) -> None:
        while True:
            for pool, backends in self._followed.items():
                for b in backends:
                    key = (pool, b.url)
                    if not b.healthy and not b.pending and key not in self._ejected:
                        self._ejected.add(key)
                        log.info("kv events of %s: ejected, its %d blocks dropped", b.url,
                                 self.index(pool).blocks(b.url))
                        self.forget(pool, b.url)
                    elif b.healthy:
                        self._ejected.discard(key)
            await asyncio.sleep(self.eject_check_s)

    async def sync(self, pools: Mapping[str, Iterable[str]]) -> None:
        """Subscribe to every backend listed (pool → URLs), stop the others."""
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        wanted = {(pool, url) for pool, urls in pools.items() for url in urls}
        for key in list(self.subscribers) + list(self._starting):
            if key not in wanted:
                await self._remove(key)
        for key in sorted(wanted):
            if key not in self.subscribers and key not in self._starting:
                self.index(key[0])
                self._pending[key] = Health(state="discovering")
                self._starting[key] = asyncio.create_task(self._start(key),
                                                          name=f"pdlb-kvevents-start {key[1]}")

    async def _start(self, key: tuple[str, str]) -> None:
        pool, url = key
        while True:
            endpoints = await self._endpoints(url)
            if endpoints:
                break
            if endpoints is not None and not self.config.discover:
                self._pending[key].state = "no_source"  # nothing configured, nothing to find
                self._starting.pop(key, None)
                return
            self._pending[key].state = "no_source" if endpoints is not None else "discovering"
            await asyncio.sleep(self._discover_interval_s)
        assert self._ctx is not None
        sub = Subscriber(url, endpoints, self.index(pool), context=self._ctx,
                         replay_timeout_s=self.config.replay_timeout_s)
        self.subscribers[key] = sub
        self._pending.pop(key, None)
        self._starting.pop(key, None)
        sub.start()
        log.info("kv events of %s (%s): subscribed to %s", url, pool,
                 ", ".join(e.endpoint for e in endpoints))

    async def _endpoints(self, url: str) -> list[Endpoint] | None:
        """Configured endpoints, else discovered ones; None while discovery cannot answer."""
        configured = self.config.backends.get(url)
        if configured:
            return [Endpoint(e, r, self.config.topic) for e, r in configured]
        if not self.config.discover:
            return []
        try:
            answer = await self._get_json(url + "/kv_event_sources")
        except Exception as exc:  # any failure: try again later
            log.debug("kv events of %s: /kv_event_sources failed: %s", url, exc)
            return None
        return parse_sources(answer, url)

    async def _remove(self, key: tuple[str, str]) -> None:
        task = self._starting.pop(key, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pending.pop(key, None)
        sub = self.subscribers.pop(key, None)
        if sub is not None:
            await sub.stop()
        self.index(key[0]).drop(key[1])

    def forget(self, pool: str, url: str) -> None:
        """The backend restarted or was ejected: its entries go now, it is unknown again."""
        sub = self.subscribers.get((pool, url))
        if sub is not None:
            sub.forget()
        else:
            self.index(pool).drop(url)
        if pool in self.pools:
            self.pools[pool].forget(url)

    async def stop(self) -> None:
        for task in [*self._tasks, *([self._watch_task] if self._watch_task else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watch_task = None
        for key in list(self.subscribers) + list(self._starting):
            await self._remove(key)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)  # every socket closed: never blocks shutdown
            self._ctx = None

    # ---------------------------------------------------------------- introspection
    def health(self, pool: str, url: str) -> dict[str, object]:
        """The event health of one backend, for /admin/state and metrics."""
        sub = self.subscribers.get((pool, url))
        h = sub.health if sub is not None else self._pending.get((pool, url), Health())
        out = h.as_dict()
        out["blocks"] = self.index(pool).blocks(url)
        out["block_size"] = self.index(pool).block_size(url)
        out["fresh"] = self.pool(pool).fresh(url)
        return out

    def collector(self) -> KVEventsCollector:
        """Prometheus samples read at scrape time (register on the app's registry)."""
        return KVEventsCollector(self)

    def states(self) -> list[tuple[str, str, Health]]:
        """(pool, url, health) of every backend followed."""
        out = [(p, u, s.health) for (p, u), s in self.subscribers.items()]
        out += [(p, u, h) for (p, u), h in self._pending.items()]
        return out


_STATES = ("discovering", "no_source", "unknown", "live", "resyncing", "stopped")


class KVEventsCollector:
    """Per-backend event counters, index sizes and subscriber states, read at scrape time."""

    def __init__(self, events: KVEvents) -> None:
        self.events = events

    def collect(self) -> Iterator[Metric]:
        labels = ["pool", "backend"]
        counters = {name: CounterMetricFamily(f"pdlb_kv_events_{name}", doc, labels=labels)
                    for name, doc in (
                        ("received", "KV-event messages received per backend."),
                        ("decoded", "KV events decoded and applied to the pool's index."),
                        ("dropped", "Malformed payloads or events, and events of unknown types."),
                        ("gaps", "Sequence gaps seen (lost messages)."),
                        ("replays", "Gaps filled from the publisher's replay endpoint."),
                        ("restarts", "Publisher restarts seen (sequence going back)."),
                        ("disconnects", "Connections to the publisher lost (entries dropped)."))}
        blocks = GaugeMetricFamily("pdlb_kv_index_blocks", "Blocks the pool's index holds for "
                                   "the backend.", labels=labels)
        state = GaugeMetricFamily("pdlb_kv_events_state", "1 for the subscriber's state.",
                                  labels=[*labels, "state"])
        for pool, url, h in self.events.states():
            for name, family in counters.items():
                family.add_metric([pool, url], float(getattr(h, name)))
            blocks.add_metric([pool, url], float(self.events.index(pool).blocks(url)))
            for name in _STATES:
                state.add_metric([pool, url, name], 1.0 if h.state == name else 0.0)
        entries = GaugeMetricFamily("pdlb_kv_index_entries", "(backend, block) entries in the "
                                    "pool's index.", labels=["pool"])
        bound = GaugeMetricFamily("pdlb_kv_index_max_entries", "The index's bound "
                                  "([kv_events] max_blocks).", labels=["pool"])
        evicted = CounterMetricFamily("pdlb_kv_index_evicted", "Entries forgotten at the bound "
                                      "(oldest first).", labels=["pool"])
        for pool, index in self.events.indexes.items():
            entries.add_metric([pool], float(len(index)))
            bound.add_metric([pool], float(index.max_blocks))
            evicted.add_metric([pool], float(index.evicted))
        yield from counters.values()
        yield from (blocks, state, entries, bound, evicted)
