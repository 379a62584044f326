"""pdlb's Prometheus metrics: created once per app, in the app's own registry.

Nothing is global (two apps in one process — as in tests — never share counters). In-flight
gauges are callbacks read at scrape time, so the request path never touches them. Counters
and histograms are pdlb's own (:class:`Counter`, :class:`Histogram`): plain numbers updated
without a lock, turned into Prometheus samples only when /metrics is scraped —
prometheus_client's take a ``threading.Lock`` in every ``inc()``/``observe()``, ~10 times
per request. That is safe because pdlb updates metrics from its event loop's thread only.
The per-request observations use label children bound once.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
)


class CounterChild:
    """One labelled series of a :class:`Counter`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    """One labelled series of a :class:`Histogram`: a count per bucket (not cumulative)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: the first bound >= value
        self.sum += value


Child = TypeVar("Child", CounterChild, HistogramChild)


class _Family(Generic[Child]):
    """A named metric with label children; registered in ``registry`` as a collector."""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self._labelset = frozenset(self.labelnames)
        self._children: dict[tuple[str, ...], Child] = {}
        if not self.labelnames:
            self._children[()] = self._new_child()  # exported as 0 from the start
        registry.register(self)  # a Collector: it has collect()

    def _new_child(self) -> Child:
        raise NotImplementedError

    def labels(self, **values: str) -> Child:
        """The child for these label values (the same object every time: bind it once)."""
        if values.keys() != self._labelset:
            raise ValueError(f"{self.name}: labels {sorted(values)} != {list(self.labelnames)}")
        key = tuple(str(values[n]) for n in self.labelnames)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def _only(self) -> Child:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {list(self.labelnames)}: use .labels()")
        return self._children[()]

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError


class Counter(_Family[CounterChild]):
    """A monotonic counter, exported as ``<name>_total``."""

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        self._only().inc(amount)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for key, child in list(self._children.items()):
            family.add_metric(key, child.value)
        yield family


class Histogram(_Family[HistogramChild]):
    """A histogram with fixed bucket bounds (cumulative ``le`` buckets at scrape time)."""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = (), *,
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self._le = [floatToGoString(b) for b in self.bounds]  # type: ignore[no-untyped-call]
        self._le.append("+Inf")
        super().__init__(name, doc, labelnames, registry=registry)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def observe(self, value: float) -> None:
        self._only().observe(value)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for key, child in list(self._children.items()):
            total = 0
            buckets = []
            for le, count in zip(self._le, child.counts, strict=True):
                total += count
                buckets.append((le, float(total)))
            family.add_metric(key, buckets, child.sum)
        yield family


def pdlb_version() -> str:
    """pdlb's version, from its installed package metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pdlb")
    except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
        return "unknown"


class BuildInfo:
    """``pdlb_build_info{version,python} 1``: which pdlb (and Python) a scrape came from."""

    def __init__(self, *, registry: CollectorRegistry) -> None:
        self._labels = [pdlb_version(), platform.python_version()]
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("pdlb_build_info", "pdlb's version and Python's, as labels;"
                                   " always 1.", labels=["version", "python"])
        family.add_metric(self._labels, 1.0)
        yield family


def _start_time() -> float:
    """The process's start (Unix time): from /proc where there is one, else now."""
    try:
        with open("/proc/self/stat", "rb") as f:
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class ProcessMetrics:
    """The standard ``process_*`` series (as prometheus_client's ProcessCollector names
    them: dashboards expect these names), read only when /metrics is scraped."""

    def __init__(self, *, registry: CollectorRegistry) -> None:
        self._start = _start_time()
        self._page = resource.getpagesize()
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        yield CounterMetricFamily("process_cpu_seconds", "CPU time (user + system) used by"
                                  " this process.", value=usage.ru_utime + usage.ru_stime)
        try:
            with open("/proc/self/statm", "rb") as f:
                rss = float(int(f.read().split()[1]) * self._page)
        except (OSError, ValueError, IndexError):
            rss = usage.ru_maxrss * 1024.0  # the peak, where /proc is missing
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size.",
                                value=rss)
        try:
            fds = float(len(os.listdir("/proc/self/fd")))
        except OSError:
            fds = float("nan")
        yield GaugeMetricFamily("process_open_fds", "Open file descriptors.", value=fds)
        yield GaugeMetricFamily("process_max_fds", "Most file descriptors the process may"
                                " open.", value=float(resource.getrlimit(
                                    resource.RLIMIT_NOFILE)[0]))
        yield GaugeMetricFamily("process_start_time_seconds", "When the process started"
                                " (Unix time).", value=self._start)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        BuildInfo(registry=r)
        ProcessMetrics(registry=r)
        self.requests = Counter(
            "pdlb_requests", "Client requests finished, by endpoint and HTTP status.",
            ["endpoint", "status"], registry=r,
        )
        self.model_requests = Counter(
            "pdlb_model_requests", "Completion requests by the model"
            " the backends serve (configured, aliased or listed in /v1/models; else \"other\","
            " \"none\" when the request named none), endpoint and status.",
            ["model", "endpoint", "status"], registry=r,
        )
        self.ttft = Histogram(
            "pdlb_ttft_seconds",
            "Time from receiving a request to sending its first response byte (streams:"
            " first event after the headers).", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "pdlb_e2e_duration_seconds", "Time from receiving a request to its last byte.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.tokenize = Histogram(
            "pdlb_tokenize_duration_seconds", "Time spent counting a prompt's tokens.",
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
            registry=r,
        )
        self.prefill = Histogram(
            "pdlb_prefill_duration_seconds", "Prefill leg: request sent to response read.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.handoff = Histogram(
            "pdlb_handoff_duration_seconds",
            "Prefill response read to decode response headers received (the KV pull and"
            " the decode's first scheduling happen here).", buckets=LATENCY_BUCKETS, registry=r,
        )
        self.decode = Histogram(
            "pdlb_decode_duration_seconds", "Decode leg: request sent to last byte relayed.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.prefill_failures = Counter(
            "pdlb_prefill_failures", "Prefill legs that gave the decode nothing usable, by reason.",
            ["reason"], registry=r,
        )
        self.upstream_errors = Counter(
            "pdlb_upstream_errors", "Failed backend calls, by pool, backend and kind.",
            ["pool", "backend", "kind"], registry=r,
        )
        self.rejections = Counter(
            "pdlb_rejections", "Requests turned away by admission control.",
            ["stage", "reason"], registry=r,
        )
        self.queue_wait = Histogram(
            "pdlb_admission_wait_seconds", "Time a request waited for a stage's token budget.",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.client_disconnects = Counter(
            "pdlb_client_disconnects", "Requests whose client went away before the end, by"
            " the phase they were in.", ["phase"], registry=r,
        )
        self.usage_rewrites = Counter(
            "pdlb_usage_rewrites", "Responses whose usage was stitched from the prefill's.",
            registry=r,
        )
        self.retries = Counter(
            "pdlb_retries", "Legs tried again after a failure, by leg and reason.",
            ["leg", "reason"], registry=r,
        )
        self.direct_decode = Counter(
            "pdlb_direct_decode", "Requests served by the decode pool alone (short prompt,"
            " prompt logprobs or beam search, or prefill pool down with"
            " prefill_fallback = decode_only).",
            registry=r,
        )
        self.stream_errors = Counter(
            "pdlb_stream_errors", "Streams that ended with an SSE error event, by code.",
            ["code"], registry=r,
        )
        self.prompt_ids = Histogram(
            "pdlb_prompt_ids_duration_seconds", "Time spent computing a prompt's exact token"
            " ids (tokenizer and chat template, or the backend's /tokenize), by source.",
            ["source"], buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                 0.5), registry=r,
        )
        self.kv_route_picks = Counter(
            "pdlb_kv_route_picks", "Picks by a KV-aware policy, by pool and by what the picked"
            " backend's prefix score came from: its own KV events, or the approximate index"
            " (events missing or stale).", ["pool", "source"], registry=r,
        )
        self.kv_predictions = Counter(
            "pdlb_kv_predictions", "Prefill legs whose cached tokens were predicted from the"
            " backend's KV events, by outcome against the cached_tokens it reported: exact,"
            " over (predicted more) or under.", ["pool", "outcome"], registry=r,
        )
        self.kv_prediction_error = Histogram(
            "pdlb_kv_prediction_error_tokens", "|predicted - reported| cached tokens per"
            " predicted prefill leg.", ["pool"],
            buckets=(0, 16, 64, 256, 1024, 4096, 16384), registry=r,
        )
        self.kv_predicted_tokens = Counter(
            "pdlb_kv_predicted_cached_tokens", "Cached tokens predicted from KV events, summed"
            " over predicted prefill legs (compare with pdlb_kv_reported_cached_tokens).",
            ["pool"], registry=r,
        )
        self.kv_reported_tokens = Counter(
            "pdlb_kv_reported_cached_tokens", "Cached tokens the backends reported on the same"
            " legs.", ["pool"], registry=r,
        )
        self.kv_skipped_prefill = Counter(
            "pdlb_kv_skipped_prefill", "Requests a decode served alone because it already held"
            " the prompt (the decode policy's pick_direct, e.g. kv_aware skip_prefill_share).",
            registry=r,
        )
        self.migrations = Counter(
            "pdlb_migrations", "Streams whose decode broke after the first byte, by outcome:"
            " migrated (a continuation reached the client), finished (the answer was complete;"
            " only its end was sent), refused (a case not continued), exhausted (no attempt"
            " left), failed (the continuation could not start).", ["outcome"], registry=r,
        )
        self.migration_tokens = Counter(
            "pdlb_migration_regenerated_tokens", "Generated tokens a continuation prefilled"
            " again (the KV the broken decode held).", registry=r,
        )
        self.migration_lost = Histogram(
            "pdlb_migration_lost_seconds", "Time a migrated stream was silent: from the break"
            " to the continuation's first byte.", buckets=LATENCY_BUCKETS, registry=r,
        )
        self._gauges: dict[str, Gauge] = {}

    def gauge(self, name: str, doc: str, labels: list[str]) -> Gauge:
        if name not in self._gauges:
            self._gauges[name] = Gauge(name, doc, labels, registry=self.registry)
        return self._gauges[name]

    def watch(self, name: str, doc: str, labels: dict[str, str], read: Callable[[], float]) -> None:
        """Expose ``read()`` as a gauge sample, evaluated only when /metrics is scraped."""
        self.gauge(name, doc, list(labels)).labels(**labels).set_function(read)

    def unwatch(self, name: str, labels: dict[str, str]) -> None:
        gauge = self._gauges.get(name)
        if gauge is not None:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels.values())

    def render(self) -> bytes:
        return generate_latest(self.registry)
