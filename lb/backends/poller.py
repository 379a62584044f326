"""A background task that visits every backend on an interval (health checks, load scrapes).

One shape for both pollers: all backends are visited concurrently each round, rounds are
``interval_s`` apart (end of one to start of the next; a first round can run before pdlb
accepts requests), the backend list can be swapped by a hot reload, and stopping cancels
the task and waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from lb.backends.pool import Backend


class BackendPoller:
    name = "pdlb-poller"

    def __init__(self, backends: Iterable[Backend], interval_s: float) -> None:
        self.backends = list(backends)
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def visit(self, backend: Backend) -> bool:
        raise NotImplementedError

    def after_round(self) -> None:
        """Called after every backend was visited once; nothing by default."""

    def set_backends(self, backends: Iterable[Backend]) -> None:
        self.backends = list(backends)

    async def first_round(self, limit_s: float) -> None:
        """Visit every backend once now, within ``limit_s``: run before pdlb accepts
        requests, so the first ones go where the checks say, not where an optimistic
        default would send them (a backend serving another model, say)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit_s):
                await self._round()

    def start(self, first_after_s: float = 0.0) -> None:
        """Start polling, the first round after ``first_after_s`` (an interval of 0 or less
        turns polling off)."""
        if self.interval_s > 0:
            self._task = asyncio.create_task(self._run(first_after_s), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _round(self) -> None:
        await asyncio.gather(*(self.visit(b) for b in self.backends))
        self.after_round()

    async def _run(self, first_after_s: float) -> None:
        await asyncio.sleep(first_after_s)
        while True:
            await self._round()
            await asyncio.sleep(self.interval_s)
