"""Active health checks: GET /health on every backend, on an interval, off the request path.

A backend leaves rotation after ``failures_to_eject`` consecutive failed checks and comes
back after ``successes_to_restore`` good ones — never removed forever. Failures seen on real
requests (connection refused, 5xx) count too (:func:`report_failure`), so a dead backend
is ejected between two checks rather than after them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from lb.config import HealthConfig
from lb.errors import PdlbError
from lb.pool import Backend
from lb.upstream import Upstream

log = logging.getLogger("pdlb.health")


class HealthChecker:
    def __init__(self, backends: Iterable[Backend], upstream: Upstream, config: HealthConfig):
        self.backends = list(backends)
        self.upstream = upstream
        self.config = config
        self._task: asyncio.Task[None] | None = None

    def set_backends(self, backends: Iterable[Backend]) -> None:
        self.backends = list(backends)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pdlb-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.gather(*(self.check(b) for b in self.backends))
            await asyncio.sleep(self.config.interval_s)

    async def check(self, backend: Backend) -> bool:
        try:
            status, _ = await self.upstream.get_text(
                backend.url + "/health", timeout_s=self.config.timeout_s
            )
            ok = status == 200
        except PdlbError:
            ok = False
        if ok:
            self.report_success(backend)
        else:
            self.report_failure(backend)
        return ok

    def report_success(self, backend: Backend) -> None:
        backend.consecutive_failures = 0
        backend.consecutive_successes += 1
        restore = self.config.successes_to_restore
        if not backend.healthy and backend.consecutive_successes >= restore:
            backend.healthy = True
            log.warning("%s back in rotation", backend)

    def report_failure(self, backend: Backend) -> None:
        backend.consecutive_successes = 0
        backend.consecutive_failures += 1
        if backend.healthy and backend.consecutive_failures >= self.config.failures_to_eject:
            backend.healthy = False
            log.warning("%s ejected after %d consecutive failures", backend,
                        backend.consecutive_failures)
