"""One process's share of a run: plan → dispatch on the absolute schedule → records.

Open loop: an item goes out at ``t0 + offset``; the dispatcher prepares the next body while
it waits, then sends everything already due without yielding, so a late wake-up delays
the requests that were due (recorded as schedule lag) instead of shifting the rest of the
schedule. A client short of CPU still falls behind (``fell_behind``; the rates one process
kept up with are measured in docs/loadgen.md). Closed loop: N users, each sending its next
request as soon as its last one ended (plus think time); its "scheduled" time is when it
became ready. With a concurrency cap on an open loop, the time a request waited for a slot
is recorded apart.

Multi-turn items: the first turn follows the schedule, later turns go after the previous
answer (plus think time), with the conversation so far. A failed turn ends its session.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import resource
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import aiohttp

from loadgen.client import (
    LoadgenError,
    Sender,
    Started,
    first_model,
    make_session,
    make_transport,
    request_headers,
)
from loadgen.config import LoadConfig
from loadgen.progress import Counters, Progress
from loadgen.records import Record
from loadgen.schedule import ArrivalSpec, from_timestamps, open_loop
from loadgen.tokenizer import load_tokenizer
from loadgen.workload import (
    Item,
    RandomWorkload,
    TextMaker,
    Turn,
    Workload,
    detect_format,
    load_jsonl,
    load_sharegpt,
)

START_LEAD_S = 0.005  # time zero is set this far ahead of "ready", so request 0 is not late


def build_workload(config: LoadConfig) -> Workload:
    """The config's workload (random, JSONL or ShareGPT)."""
    turns = config.resolved_turns
    if config.dataset:
        fmt = config.dataset_format
        if fmt == "auto":
            fmt = detect_format(config.dataset)
        if fmt == "jsonl":
            if turns > 1:
                raise ValueError("multi-turn sessions from a JSONL file: put the history in "
                                 "'messages' on each line instead of --turns")
            return load_jsonl(config.dataset, config.resolved_output_len, seed=config.seed)
        tok = load_tokenizer(config.tokenizer)
        limit = num_items(config, None)
        return load_sharegpt(config.dataset, tok.count, turns=turns, seed=config.seed,
                             limit=limit if limit is not None else None,
                             fixed_output_len=config.output_len.mean
                             if config.output_len else None)
    text = TextMaker(load_tokenizer(config.tokenizer))
    return RandomWorkload(
        text=text, input_len=config.resolved_input_len, output_len=config.resolved_output_len,
        seed=config.seed, turns=turns, prefix_groups=config.prefix_groups,
        prefix_len=config.prefix_len, questions_per_group=config.questions_per_group,
    )


def num_items(config: LoadConfig, workload: Workload | None) -> int | None:
    """How many items (sessions) the run sends; None when only a duration bounds it."""
    if config.num_requests is not None:
        return math.ceil(config.num_requests / config.resolved_turns)
    if config.duration_s is None and workload is not None:
        return workload.size
    return None


def schedule_for(config: LoadConfig, workload: Workload) -> list[float] | None:
    """Absolute offsets of every item (open loop, trace); None for a closed loop."""
    n = num_items(config, workload)
    if config.mode == "closed":
        return None
    if config.mode == "trace":
        stamps = workload.timestamps()
        if stamps is None:
            raise ValueError(f"{config.dataset}: no timestamps to replay; give --rate R or "
                             "--concurrency N")
        offsets = from_timestamps(stamps, config.time_scale)
        size = workload.size or len(offsets)
        if n is not None and n > size:
            raise ValueError(f"trace has {size} requests, {n} asked; a trace is not cycled")
        if config.duration_s is not None:
            offsets = [o for o in offsets if o < config.duration_s]
        return offsets[:n] if n is not None else offsets
    if config.rate is None:  # guarded by LoadConfig
        raise ValueError("open loop needs a rate")
    spec = ArrivalSpec(rate=config.rate, arrival=config.arrival, burstiness=config.burstiness,
                       ramp_to=config.ramp_to)
    return open_loop(spec, duration_s=config.duration_s, num_requests=n, seed=config.seed)


@dataclass
class ProcessResult:
    records: list[Record]
    meta: dict[str, Any] = field(default_factory=dict)


class _Run:
    """State of one process's run; methods are the dispatcher, users and item runner."""

    def __init__(self, config: LoadConfig, workload: Workload, sender: Sender, t0: float,
                 worker: int, turns_max: int) -> None:
        self.config = config
        self.workload = workload
        self.sender = sender
        self.t0 = t0
        self.worker = worker
        self.turns_max = turns_max
        self.records: list[Record] = []
        self.counters = Counters()
        self.stop_at = t0 + config.duration_s if config.duration_s is not None else math.inf
        self.stopping = asyncio.Event()
        cap = config.max_concurrency if config.mode != "closed" else None
        self.sem = asyncio.Semaphore(cap) if cap else None

    def _accepting(self) -> bool:
        return not self.stopping.is_set() and perf_counter() < self.stop_at

    def _record(self, item: Item, k: int, scheduled: float) -> Record:
        turn = item.turns[k]
        rec = Record(
            index=item.index * self.turns_max + k, scheduled=scheduled, worker=self.worker,
            session=item.index if len(item.turns) > 1 else None, turn=k, group=item.group,
            expected_input_len=turn.input_len, max_tokens=turn.max_tokens,
        )
        self.records.append(rec)
        return rec

    def _start(self, body: bytes, rec: Record, want_text: bool) -> Started:
        self.counters.sent += 1
        return self.sender.start(body, rec, want_text)

    async def _finish(self, started: Started) -> str:
        try:
            return await self.sender.finish(started)
        finally:
            rec = started.rec
            self.counters.on_done(perf_counter() - self.t0, rec.ok, rec.ttft, rec.schedule_lag)

    async def run_item(self, item: Item, scheduled: float, body: bytes,
                       started: Started | None = None) -> None:
        """Send the item's turns; ``started``: turn 0 was already sent by the dispatcher."""
        history: list[tuple[str, str]] = []
        last = len(item.turns) - 1
        for k, turn in enumerate(item.turns):
            if k > 0:
                if self.config.think_time_s:
                    await asyncio.sleep(self.config.think_time_s)
                if not self._accepting():
                    return
                scheduled = perf_counter() - self.t0
                body = self.sender.body(item, k, history)
            if k == 0 and started is not None:
                rec = started.rec
                text = await self._finish(started)
            else:
                rec = self._record(item, k, scheduled)
                if self.sem is not None:
                    t_wait = perf_counter()
                    async with self.sem:
                        rec.queue_wait = perf_counter() - t_wait
                        text = await self._finish(self._start(body, rec, k < last))
                else:
                    text = await self._finish(self._start(body, rec, k < last))
            if not rec.ok:
                return
            history.append((turn.text or "", text))

    async def open_loop(self, indices: list[int], offsets: list[float]) -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        t0 = self.t0
        for i, off in zip(indices, offsets, strict=True):
            item = self.workload.item(i)
            body = self.sender.body(item, 0)
            due = t0 + off
            delay = due - perf_counter()
            if delay > 0.25:  # long gap (slow rate, trace): stay interruptible
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay - 0.01)
                delay = due - perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.stopping.is_set():
                break
            started = None
            if self.sem is None:  # send right here, not when the task first runs
                started = self._start(body, self._record(item, 0, off), len(item.turns) > 1)
            task = loop.create_task(self.run_item(item, off, body, started))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await self._drain(tasks)

    async def closed_loop(self, users: int, indices: Iterator[int]) -> None:
        async def user() -> None:
            for i in indices:
                if not self._accepting():
                    return
                item = self.workload.item(i)
                body = self.sender.body(item, 0)
                await self.run_item(item, perf_counter() - self.t0, body)
                if self.config.think_time_s:
                    await asyncio.sleep(self.config.think_time_s)

        tasks = {asyncio.ensure_future(user()) for _ in range(users)}
        await self._drain(tasks)

    async def _drain(self, tasks: set[asyncio.Task[None]]) -> None:
        """Wait for ``tasks``; when the run is stopped, give them 2 s, then cancel them.
        A bug inside a task (not a failed request: those are records) is re-raised."""
        if not tasks:
            return
        tasks = set(tasks)
        everything: asyncio.Future[list[Any]] = asyncio.gather(*tasks, return_exceptions=True)
        stop: asyncio.Future[Any] = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({everything, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not everything.done():  # interrupted
                await asyncio.wait({everything}, timeout=2.0)
                for t in tasks:
                    t.cancel()
            results = await everything
        finally:
            stop.cancel()
        for r in results:
            if isinstance(r, Exception):
                raise r


def _slice(total: int | None, worker: int, n_workers: int) -> Iterator[int]:
    i = worker
    while total is None or i < total:
        yield i
        i += n_workers


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """Move setup garbage out of the collector's way and make collections rarer during the
    run (a full collection over millions of records is a multi-ms schedule-lag spike)."""
    old = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


async def run_process(
    config: LoadConfig,
    *,
    worker: int = 0,
    n_workers: int = 1,
    model: str | None = None,
    t0_epoch: Callable[[], float] | None = None,
    progress: Callable[[Progress], None] | None = None,
    progress_interval_s: float = 1.0,
    workload: Workload | None = None,
    stopping: asyncio.Event | None = None,
    before_start: Callable[[], Awaitable[None]] | None = None,
) -> ProcessResult:
    """Run this process's slice (``worker`` of ``n_workers``) and return its records.

    ``t0_epoch``, when given, is awaited-for time zero as wall-clock seconds (how worker
    processes share one schedule); it is called once setup is done. ``before_start`` is
    awaited just before time zero (after preflight and warm-up).
    """
    workload = workload or build_workload(config)
    offsets = schedule_for(config, workload)
    n_items = num_items(config, workload)
    turns_max = config.resolved_turns
    limit = 0
    if config.mode == "closed" and config.concurrency:
        limit = config.concurrency
    elif config.max_concurrency:
        limit = config.max_concurrency
    session = make_session(limit, config.timeout_s)
    sender: Sender | None = None
    meta: dict[str, Any] = {"worker": worker}
    try:
        hdrs = request_headers(config.headers, config.api_key)
        model = model or config.model or await first_model(session, config.url, hdrs)
        meta["model"] = model
        sender = make_sender(config, session, model)
        if config.preflight and worker == 0:
            await preflight(sender, config.api_url)
        if config.warmup:
            await _warmup(sender, workload, config.warmup, worker, n_workers)
        if before_start is not None:
            await before_start()
        # The full collection in quiet_gc() takes several ms: it is setup, done before time
        # zero is fixed (after it, request 0 went out that much late).
        with quiet_gc():
            if t0_epoch is not None:
                epoch = t0_epoch()
                t0 = perf_counter() + (epoch - time.time())
            else:
                t0 = perf_counter() + START_LEAD_S
                epoch = time.time() + START_LEAD_S
            meta["t0_epoch"] = epoch
            sender.t0 = t0
            run = _Run(config, workload, sender, t0, worker, turns_max)
            if stopping is not None:
                run.stopping = stopping
            ticker = asyncio.ensure_future(_tick(run, progress, progress_interval_s, offsets,
                                                 worker, n_workers))
            cpu0, wall0 = time.process_time(), perf_counter()
            nivcsw0 = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
            try:
                if offsets is not None:
                    mine = list(range(worker, len(offsets), n_workers))
                    await run.open_loop(mine, [offsets[i] for i in mine])
                else:
                    users = len(range(worker, config.concurrency or 1, n_workers))
                    await run.closed_loop(users, _slice(n_items, worker, n_workers))
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
        if progress is not None:
            progress(run.counters.snapshot(perf_counter() - t0))
        meta["client_cpu_s"] = time.process_time() - cpu0
        meta["client_preempted"] = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - nivcsw0
        meta["client_wall_s"] = perf_counter() - wall0
        meta["interrupted"] = run.stopping.is_set()
        meta["first_send"] = min((r.sent for r in run.records if r.sent is not None),
                                 default=None)
        meta["planned_items"] = len(range(worker, len(offsets), n_workers)) if offsets else None
        return ProcessResult(run.records, meta)
    finally:
        if sender is not None:
            await sender.transport.aclose()
        await session.close()


def make_sender(config: LoadConfig, session: aiohttp.ClientSession, model: str) -> Sender:
    """The run's sender on the configured HTTP client (``fast`` or ``aiohttp``)."""
    headers = request_headers(config.headers, config.api_key)
    transport = make_transport(config.http_client, config.api_url, headers, session)
    return Sender(transport, endpoint=config.resolved_endpoint, model=model, t0=0.0,
                  ignore_eos=config.ignore_eos, continuous_usage=config.continuous_usage,
                  extra_body=config.extra_body, timeout_s=config.timeout_s)


async def _tick(run: _Run, progress: Callable[[Progress], None] | None, interval: float,
                offsets: list[float] | None, worker: int, n_workers: int) -> None:
    if progress is None:
        return
    planned = len(range(worker, len(offsets), n_workers)) if offsets is not None else None
    while True:
        await asyncio.sleep(interval)
        progress(run.counters.snapshot(perf_counter() - run.t0, planned))


async def preflight(sender: Sender, url: str = "the server") -> None:
    """One tiny request before time zero: fail fast, with the server's words."""
    item = Item(index=-1, turns=(Turn(max_tokens=2, text="Hello"),))
    rec = Record(index=-1, scheduled=0.0)
    await sender.send(sender.body(item, 0), rec)
    if not rec.ok:
        hint = ""
        if rec.status == 400:
            hint = (" — a server that rejects vLLM's extensions needs --no-ignore-eos and/or "
                    "--no-continuous-usage")
        raise LoadgenError(f"preflight request to {url} failed: {rec.error}{hint} "
                           "(use --no-preflight to skip this check)")


async def _warmup(sender: Sender, workload: Workload, n: int, worker: int,
                  n_workers: int) -> None:
    """``n`` unrecorded requests (this worker's share), concurrently, to open connections."""
    mine = len(range(worker, n, n_workers))
    base = 1 << 40

    async def one(k: int) -> None:
        item = workload.item(base + k)
        await sender.send(sender.body(item, 0), Record(index=-1, scheduled=0.0))

    with contextlib.suppress(aiohttp.ClientError):
        await asyncio.gather(*(one(k) for k in range(mine)))
