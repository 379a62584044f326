"""``--workers N``: N processes, each sending its slice (i mod N) of one absolute schedule.

Every worker rebuilds the same schedule and workload from the seed, sets up its session and
tokenizer, and reports ready; the parent then sets one wall-clock time zero for all. Records
come back as JSONL files and are merged. Progress snapshots travel over a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from loadgen.client import LoadgenError
from loadgen.config import LoadConfig
from loadgen.progress import Progress, merge
from loadgen.records import Record, read_jsonl, write_jsonl
from loadgen.runner import ProcessResult, run_process

START_MARGIN_S = 0.05


def _worker_main(config: LoadConfig, worker: int, n_workers: int, model: str,
                 t0_value: Any, go: Any, q: Any, out_path: str) -> None:
    """Entry point of one worker process (spawned, so it imports afresh)."""
    try:
        import uvloop
        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        new_loop = asyncio.new_event_loop

    def t0_epoch() -> float:
        q.put(("ready", worker, None))
        go.wait()
        return float(t0_value.value)

    async def main() -> ProcessResult:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        return await run_process(
            config, worker=worker, n_workers=n_workers, model=model, t0_epoch=t0_epoch,
            progress=lambda p: q.put(("progress", worker, p)), stopping=stopping,
        )

    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            result = runner.run(main())
        write_jsonl(result.records, out_path)
        q.put(("done", worker, result.meta))
    except BaseException as exc:  # report anything, then die
        q.put(("error", worker, f"{type(exc).__name__}: {exc}"))
        raise


async def run_workers(
    config: LoadConfig,
    model: str,
    progress: Callable[[Progress], None] | None = None,
    stopping: asyncio.Event | None = None,
    before_start: Callable[[], Awaitable[None]] | None = None,
) -> ProcessResult:
    """Run ``config.workers`` processes and merge their records."""
    n = config.workers
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    go = ctx.Event()
    t0_value = ctx.Value("d", 0.0)
    tmp = tempfile.mkdtemp(prefix="loadgen-")
    paths = [os.path.join(tmp, f"worker{w}.jsonl") for w in range(n)]
    procs = [ctx.Process(target=_worker_main, daemon=True, name=f"loadgen-worker-{w}",
                         args=(config, w, n, model, t0_value, go, q, paths[w]))
             for w in range(n)]
    for p in procs:
        p.start()
    loop = asyncio.get_running_loop()
    ready: set[int] = set()
    metas: dict[int, dict[str, Any]] = {}
    snaps: dict[int, Progress] = {}
    error: str | None = None
    try:
        while len(metas) < n:
            if stopping is not None and stopping.is_set():
                for p in procs:
                    if p.is_alive() and p.pid is not None:
                        os.kill(p.pid, signal.SIGINT)
                stopping = None  # ask once; keep collecting what they send back
            try:
                kind, w, payload = await loop.run_in_executor(None, q.get, True, 0.2)
            except queue_mod.Empty:
                if any(not p.is_alive() and p.exitcode not in (0, None) for p in procs) \
                        and error is None and len(metas) < n:
                    dead = [p.name for p in procs if p.exitcode not in (0, None)]
                    error = f"worker(s) died: {', '.join(dead)}"
                    break
                continue
            if kind == "ready":
                ready.add(w)
                if len(ready) == n:
                    if before_start is not None:
                        await before_start()
                    t0_value.value = time.time() + START_MARGIN_S
                    go.set()
            elif kind == "progress":
                snaps[w] = payload
                if progress is not None and len(snaps) == n:
                    progress(merge(snaps.values()))
            elif kind == "done":
                metas[w] = payload
            elif kind == "error":
                error = f"worker {w}: {payload}"
                break
    finally:
        go.set()
        if error is not None:
            for p in procs:
                if p.is_alive():
                    p.terminate()
        for p in procs:
            await loop.run_in_executor(None, p.join, 10)
    if error is not None:
        raise LoadgenError(error)
    records: list[Record] = []
    for path in paths:
        records.extend(read_jsonl(path))
        with contextlib.suppress(OSError):
            os.remove(path)
    with contextlib.suppress(OSError):
        os.rmdir(tmp)
    records.sort(key=lambda r: (r.scheduled, r.index))
    firsts = [m["first_send"] for m in metas.values() if m.get("first_send") is not None]
    meta = {
        "workers": n,
        "model": model,
        "t0_epoch": metas[0]["t0_epoch"],
        "first_send": min(firsts) if firsts else None,
        "interrupted": any(m.get("interrupted") for m in metas.values()),
        "client_cpu_s": sum(m.get("client_cpu_s", 0.0) for m in metas.values()),
        "client_preempted": sum(m.get("client_preempted", 0) for m in metas.values()),
        "client_wall_s": max(m.get("client_wall_s", 0.0) for m in metas.values()),
    }
    return ProcessResult(records, meta)
