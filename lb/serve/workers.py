"""``pdlb serve --workers N``: N pdlb processes sharing one port (SO_REUSEPORT).

pdlb's hot path is one event loop, so one process uses at most one core. With ``--workers N``
the kernel spreads incoming connections over N processes bound to the same port. What that
means, honestly:

* each worker keeps its own in-flight counters, health state and policy state — routing in
  one worker does not see requests in flight in the others (a policy's view is 1/N of the
  traffic, which averages out for load-based policies but weakens prefix/session affinity);
* the pools' token budgets (``max_inflight_tokens``, also ``"auto"``) are one set for all
  workers. Without ``[cluster]``, the parent makes a file in the workers' folder with one
  slot per worker (lb/backends/local_budgets.py): each worker writes its own holdings
  there, and an admission sums the slots and reserves under an exclusive ``flock`` (held
  for microseconds); a slot whose heartbeat is older than 2 s (a worker that died or
  stalled) is ignored, and the parent zeroes the slot of a worker that exited. A request
  waiting for tokens another worker frees asks again every 5 ms. With ``[cluster]`` the
  workers are replicas like any other and share the whole budget through Redis (count
  them in ``[cluster] replicas`` for the fallback share while Redis is down);
* what each worker enforces on its own is divided by N, so the whole stays within the
  configured totals: the wait queues (``max_queue`` — each worker has its own line, FIFO
  within it, not across workers), ``max_concurrent_requests``, and the per-backend
  ``max_inflight_tokens`` (checked against the worker's own in-flight counters);
* ``/metrics`` answers for every worker in one scrape: each worker also serves its own
  metrics on a private loopback port (announced in a folder the parent makes,
  ``PDLB_WORKERS_DIR``), and the worker that takes the scrape reads its siblings' and
  merges them, each series labelled ``worker="<index>"`` (sum by ``without (worker)`` for
  the totals). ``/admin`` still answers for the worker that took the connection.

The parent reserves the port, starts the workers, forwards SIGTERM/SIGINT/SIGHUP to them,
and exits when they have all exited.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from lb.backends import local_budgets
from lb.config import Config

WORKERS_DIR_ENV = "PDLB_WORKERS_DIR"
WORKER_INDEX_ENV = "PDLB_WORKER_INDEX"


@dataclasses.dataclass(frozen=True, slots=True)
class Siblings:
    """Where the workers of one ``pdlb serve --workers N`` announce their metrics ports."""

    folder: Path
    index: int

    @classmethod
    def from_env(cls) -> Siblings | None:
        folder = os.environ.get(WORKERS_DIR_ENV)
        index = os.environ.get(WORKER_INDEX_ENV)
        if not folder or index is None or not index.isdigit():
            return None
        return cls(Path(folder), int(index))

    def announce(self, url: str) -> None:
        """Publish this worker's private metrics URL (atomically: a reader sees all or none)."""
        tmp = self.folder / f".{self.index}.tmp"
        tmp.write_text(url)
        tmp.replace(self.folder / str(self.index))

    def others(self) -> dict[int, str]:
        """The other workers' metrics URLs, by index."""
        found: dict[int, str] = {}
        with contextlib.suppress(OSError):
            for entry in self.folder.iterdir():
                if entry.name.isdigit() and int(entry.name) != self.index:
                    with contextlib.suppress(OSError):
                        found[int(entry.name)] = entry.read_text().strip()
        return found


class _Merged:
    """A collector over already-merged families (for generate_latest)."""

    def __init__(self, families: Iterator[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge_metrics(texts: Mapping[int, str]) -> bytes:
    """Several workers' Prometheus texts as one, each sample labelled ``worker``."""
    families: dict[str, Metric] = {}
    for index in sorted(texts):
        for family in text_string_to_metric_families(texts[index]):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
            worker = str(index)
            merged.samples.extend(s._replace(labels={**s.labels, "worker": worker})
                                  for s in family.samples)
    return generate_latest(_Merged(iter(families.values())))


def share(config: Config, workers: int) -> Config:
    """The per-worker config: what each worker enforces on its own divided by ``workers``
    (rounded up, at least 1). The pools' ``max_inflight_tokens`` stay whole: the workers
    share them — through Redis with ``[cluster]`` (whose fallback share while Redis is down
    is ``budget / [cluster] replicas``, counting every worker), else through one file
    (lb/backends/local_budgets.py). Dividing them here as well would make the shared total
    ``budget / workers``. Tenants' limits (``[tenants]``) are divided too, unless they live
    in Redis (``[cluster]``)."""

    def part(value: int | None) -> int | None:
        return None if value is None else max(1, -(-value // workers))

    pools = {}
    for name, pool in config.pools.items():
        backends = tuple(dataclasses.replace(b, max_inflight_tokens=part(b.max_inflight_tokens))
                         for b in pool.backends)
        pools[name] = dataclasses.replace(
            pool, backends=backends,
            max_queue=part(pool.max_queue) or 0,
        )
    server = dataclasses.replace(
        config.server, max_concurrent_requests=part(config.server.max_concurrent_requests))
    tenancy = config.tenancy
    if config.cluster.redis_url is None:  # with [cluster] tenants' limits are whole in Redis
        tenancy = dataclasses.replace(tenancy, tenants={
            name: dataclasses.replace(t, requests=part(t.requests), tokens=part(t.tokens),
                                      concurrent=part(t.concurrent))
            for name, t in tenancy.tenants.items()})
    return dataclasses.replace(config, pools=pools, server=server, tenancy=tenancy)


def _reserve_port(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _die_with_parent() -> None:
    """In each worker, before exec: get SIGTERM when the parent dies, even by SIGKILL, so
    workers are never orphaned (Linux prctl PR_SET_PDEATHSIG; a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_workers(argv: Sequence[str], config: Config, workers: int) -> int:
    """Start ``workers`` copies of ``pdlb serve`` (``argv`` minus --workers) on one port."""
    try:
        holder = _reserve_port(config.server.host, config.server.port)
    except OSError as exc:
        from lb.serve.server import listen_error

        print(f"pdlb: cannot listen on {config.server.host}:{config.server.port}: "
              f"{listen_error(exc)}", file=sys.stderr)
        return 2
    port = holder.getsockname()[1]
    base = [sys.executable, "-m", "lb.cli", "serve", *argv, "--port", str(port),
            "--worker-share", str(workers), "--reuse-port"]
    folder = tempfile.TemporaryDirectory(prefix="pdlb-workers-")
    budgets = Path(folder.name) / local_budgets.FILE_NAME
    local_budgets.create(budgets, workers)
    children = [subprocess.Popen(base, stdout=subprocess.PIPE, text=True,
                                 preexec_fn=_die_with_parent,
                                 env={**os.environ, WORKERS_DIR_ENV: folder.name,
                                      WORKER_INDEX_ENV: str(index)})
                for index in range(workers)]
    url = ""
    try:
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline()
            if not line.startswith("pdlb listening on "):
                raise RuntimeError(f"a worker failed to start (exit {child.wait()})")
            url = line.split()[-1]
    except RuntimeError as exc:
        for child in children:
            child.terminate()
        folder.cleanup()
        print(f"pdlb: {exc}", file=sys.stderr)
        return 1
    finally:
        holder.close()
    print(f"pdlb listening on {url} ({workers} workers, pids"
          f" {', '.join(str(c.pid) for c in children)})", flush=True)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    codes: dict[int, int] = {}
    while len(codes) < len(children):  # in whatever order they exit
        for index, child in enumerate(children):
            if index not in codes and (code := child.poll()) is not None:
                codes[index] = code
                local_budgets.clear_slot(budgets, index)  # its tokens are back at once
        if len(codes) < len(children):
            time.sleep(0.1)
    folder.cleanup()
    return max(codes.values(), key=abs) if any(codes.values()) else 0

