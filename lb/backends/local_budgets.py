"""Admission budgets shared by the workers of one ``pdlb serve --workers N`` (no Redis).

The parent makes one file in the workers' folder (``PDLB_WORKERS_DIR``) with one slot per
worker index; every worker maps it (mmap). A slot holds the tokens that worker holds per
stage (int64, in :data:`lb.admission.STAGES` order) and a heartbeat (float64,
``time.monotonic()``, the same clock in every process of the machine). A worker writes only
its own slot.

* :meth:`WorkerBudgets.reserve`: take an exclusive ``flock`` on the file (held for
  microseconds), sum the slots whose heartbeat is fresher than ``ttl_s`` (its own always
  counts), and add the request's tokens to its own slot only if every stage stays within its
  limit; unlock.
* :meth:`WorkerBudgets.adjust` (releases, corrections) adds to its own slot, under the same
  lock (so a reader never sees a half-written number).
* A background task refreshes the heartbeat every ``ttl_s / 4``. A worker that died (or
  whose event loop stalled longer than ``ttl_s``) stops counting after ``ttl_s``; the parent
  also zeroes the slot of a worker that exited (:func:`clear_slot`).

The store is always available (``shared`` is True): there is no local fallback to divide.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from lb.admission import STAGES

_SLOT = 64
"""Bytes per slot (one cache line): len(STAGES) int64 + one float64 heartbeat."""
_TOKENS = struct.Struct(f"<{len(STAGES)}q")
_BEAT = struct.Struct("<d")
_BEAT_AT = _TOKENS.size
FILE_NAME = "budgets"


def create(path: Path, workers: int) -> None:
    """The parent's part: a zeroed file with ``workers`` slots."""
    with open(path, "wb") as f:
        f.write(b"\0" * (_SLOT * max(1, workers)))


def clear_slot(path: Path, index: int) -> None:
    """The parent's part when worker ``index`` has exited: its tokens are back at once."""
    with contextlib.suppress(OSError), open(path, "r+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            f.seek(index * _SLOT)
            f.write(b"\0" * _SLOT)
            f.flush()
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class WorkerBudgets:
    """A :class:`lb.admission.BudgetStore` on a file mapped by every worker."""

    def __init__(self, path: Path, index: int, *, ttl_s: float = 2.0,
                 poll_s: float = 0.005) -> None:
        self.path = path
        self.index = index
        self.ttl_s = ttl_s
        self._poll_s = poll_s
        self._fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(self._fd).st_size
            if size < _SLOT * (index + 1) or size % _SLOT:
                raise ValueError(f"{path}: {size} bytes has no slot for worker {index}")
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        self._workers = size // _SLOT
        self._own = index * _SLOT
        self._task: asyncio.Task[None] | None = None
        self.global_used: dict[str, int] = {}
        """Each stage's use over the fresh slots as the last reservation left it."""
        with self._locked():
            _TOKENS.pack_into(self._map, self._own, *([0] * len(STAGES)))
            self._beat()

    # -- the BudgetStore protocol -----------------------------------------------------------

    @property
    def shared(self) -> bool:
        return True

    @property
    def replicas(self) -> int:
        return self._workers

    @property
    def poll_s(self) -> float:
        return self._poll_s

    def follow(self, held: Callable[[], Mapping[str, int]]) -> None:
        """Nothing to rebuild: the slot is never lost while this worker lives."""

    async def reserve(self, need: Mapping[str, int],
                      limits: Mapping[str, int | None]) -> str | None:
        return self.reserve_now(need, limits)

    def reserve_now(self, need: Mapping[str, int],
                    limits: Mapping[str, int | None]) -> str | None:
        """:meth:`reserve`, synchronously (it never waits for more than the lock)."""
        with self._locked():
            now = time.monotonic()
            used = [0] * len(STAGES)
            for slot in range(self._workers):
                at = slot * _SLOT
                if slot != self.index and now - _BEAT.unpack_from(self._map, at + _BEAT_AT)[0] \
                        > self.ttl_s:
                    continue  # a worker that died or stalled: its tokens no longer count
                for i, tokens in enumerate(_TOKENS.unpack_from(self._map, at)):
                    used[i] += tokens
            self.global_used = dict(zip(STAGES, used, strict=True))
            for i, name in enumerate(STAGES):
                limit = limits.get(name)
                if limit is not None and used[i] + need.get(name, 0) > limit:
                    return name
            self._add(need)
            self.global_used = {name: used[i] + need.get(name, 0)
                                for i, name in enumerate(STAGES)}
            return None

    def adjust(self, deltas: Mapping[str, int]) -> None:
        if any(deltas.values()):
            with self._locked():
                self._add(deltas)

    # -- lifecycle --------------------------------------------------------------------------

    def held(self) -> dict[str, int]:
        """This worker's slot (what it holds per stage)."""
        return dict(zip(STAGES, _TOKENS.unpack_from(self._map, self._own), strict=True))

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._heartbeat())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def close(self) -> None:
        """Zero this worker's slot and unmap the file."""
        with contextlib.suppress(ValueError, OSError):
            with self._locked():
                self._map[self._own:self._own + _SLOT] = b"\0" * _SLOT
            self._map.close()
            os.close(self._fd)

    # -- internals --------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 4)
            with self._locked():
                self._beat()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _beat(self) -> None:
        _BEAT.pack_into(self._map, self._own + _BEAT_AT, time.monotonic())

    def _add(self, deltas: Mapping[str, int]) -> None:
        tokens = list(_TOKENS.unpack_from(self._map, self._own))
        for i, name in enumerate(STAGES):
            tokens[i] += deltas.get(name, 0)
        _TOKENS.pack_into(self._map, self._own, *tokens)
        self._beat()
