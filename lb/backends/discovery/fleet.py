"""Every pool's discovery sources, merged with its static backends and applied to the pool.

A pool's backends are its static ``backends`` (file order) followed by what its sources
found (sorted; a URL listed statically keeps its static settings). A changed set goes
through the reload path, :meth:`Pool.replace_backends`, and then ``on_change`` (the app's
``rebuild_all``: health checker, scraper, KV-event fleet): added backends are pending until
their first health check passes, removed ones finish what they have, kept ones keep their
counters. A hot reload of the file calls :meth:`Discovery.reconfigure` (sources whose table
did not change keep running and keep their set) and :meth:`Discovery.merged` for the new
static part.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from lb.backends.discovery.source import Runner, Source
from lb.backends.pool import Pool
from lb.config import BackendConfig, DiscoveryConfig, DnsDiscoveryConfig, PoolConfig

log = logging.getLogger("pdlb.discovery")

BuildSource = Callable[[DiscoveryConfig], Source]


def build_source(config: DiscoveryConfig) -> Source:
    """The source for a discovery table (raises ConfigError: an unreadable kubeconfig...)."""
    if isinstance(config, DnsDiscoveryConfig):
        from lb.backends.discovery.dns import DnsSource

        return DnsSource(config)
    from lb.backends.discovery import kubeauth
    from lb.backends.discovery.kubernetes import KubernetesSource

    access = (kubeauth.in_cluster() if config.kubeconfig is None
              else kubeauth.from_kubeconfig(config.kubeconfig, config.context))
    return KubernetesSource(config, access)


class Discovery:
    """The app's discovery: one :class:`Runner` per (pool, discovery table)."""

    def __init__(self, pools: Mapping[str, Pool], on_change: Callable[[], None],
                 build: BuildSource = build_source) -> None:
        self.pools = pools
        self.on_change = on_change
        self.build = build
        self.static: dict[str, PoolConfig] = {name: pool.config for name, pool in pools.items()}
        self.runners: dict[str, dict[DiscoveryConfig, Runner]] = {}
        self._started = False
        self._stopping: set[asyncio.Task[None]] = set()
        self.reconfigure(self.static)

    def enabled(self) -> bool:
        return any(self.runners.values())

    def reconfigure(self, configs: Mapping[str, PoolConfig]) -> None:
        """Adopt the pools' (new) discovery tables: unchanged ones keep running, removed ones
        stop (their backends leave with the next :meth:`merged`), new ones start. Every new
        source is built before anything changes, so a ConfigError changes nothing."""
        built = {(name, dc): self.build(dc) for name, pc in configs.items()
                 for dc in pc.discovery if dc not in self.runners.get(name, {})}
        for name, pool_config in configs.items():
            old = self.runners.get(name, {})
            runners: dict[DiscoveryConfig, Runner] = {}
            for dc in pool_config.discovery:
                runner = old.pop(dc, None)
                if runner is None:
                    runner = Runner(name, dc.source, dc.kind, built[name, dc], self._changed)
                    if self._started:
                        runner.start()
                runners[dc] = runner
            for gone in old.values():
                task = asyncio.create_task(gone.stop())
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
            self.runners[name] = runners
            self.static[name] = pool_config

    def merged(self, config: PoolConfig) -> PoolConfig:
        """``config`` (a pool's static part) with the backends its sources found now."""
        backends = list(config.backends)
        listed = {b.url for b in backends}
        for dc, runner in self.runners.get(config.name, {}).items():
            for url in sorted(runner.urls or ()):
                if url not in listed:
                    listed.add(url)
                    backends.append(BackendConfig(url, dc.max_inflight_tokens))
        return replace(config, backends=tuple(backends))

    async def start(self, limit_s: float) -> None:
        """Start every source and wait (at most ``limit_s``) for each one's first answer,
        so that pdlb's first health round already checks what they found."""
        self._started = True
        runners = [r for runners in self.runners.values() for r in runners.values()]
        for runner in runners:
            runner.start()
        if runners:
            waits = [asyncio.ensure_future(r.answered.wait()) for r in runners]
            _, late = await asyncio.wait(waits, timeout=limit_s)
            for wait in late:
                wait.cancel()

    async def stop(self) -> None:
        for runners in self.runners.values():
            for runner in runners.values():
                await runner.stop()
        if self._stopping:
            await asyncio.gather(*self._stopping)

    def _changed(self, runner: Runner) -> None:
        name = runner.pool
        pool = self.pools[name]
        added, removed = pool.replace_backends(self.merged(self.static[name]), pool.policy)
        if added or removed:
            count = len(pool.backends)
            log.info("%s pool: discovery %s: %s (%d backend%s)", name, runner.label,
                     ", ".join([*(f"added {u}" for u in added),
                                *(f"removed {u}" for u in removed)]),
                     count, "" if count == 1 else "s")
            self.on_change()

    def status(self, pool: str) -> list[dict[str, Any]]:
        """Each source of the pool, for /admin/state."""
        return [runner.status() for runner in self.runners.get(pool, {}).values()]

    def collector(self) -> _Collector:
        return _Collector(self)


class _Collector:
    """pdlb_discovery_backends / _errors_total / _updates_total per pool and source."""

    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery

    def collect(self) -> Iterator[Metric]:
        labels = ["pool", "source"]
        backends = GaugeMetricFamily("pdlb_discovery_backends", "Backends a discovery source"
                                     " last found (its last good set).", labels=labels)
        errors = CounterMetricFamily("pdlb_discovery_errors", "Discovery tries that failed"
                                     " (the last good set was kept).", labels=labels)
        updates = CounterMetricFamily("pdlb_discovery_updates", "Changes of a discovery"
                                      " source's set applied to its pool.", labels=labels)
        for pool, runners in self.discovery.runners.items():
            for runner in runners.values():
                key = [pool, runner.label]
                backends.add_metric(key, float(len(runner.urls or ())))
                errors.add_metric(key, float(runner.errors))
                updates.add_metric(key, float(runner.updates))
        yield backends
        yield errors
        yield updates
