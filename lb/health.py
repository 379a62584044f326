"""Active health checks: GET /health on every backend, on an interval, off the request path.

A backend leaves rotation after ``failures_to_eject`` consecutive failed checks and comes
back after ``successes_to_restore`` good ones — never removed forever. Failures seen on real
requests (connection refused, 5xx) count too (:func:`report_failure`), so a dead backend
is ejected between two checks rather than after them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from lb.config import HealthConfig
from lb.errors import PdlbError
from lb.poller import BackendPoller
from lb.pool import Backend
from lb.upstream import Upstream

log = logging.getLogger("pdlb.health")


class HealthChecker(BackendPoller):
    name = "pdlb-health"

    def __init__(self, backends: Iterable[Backend], upstream: Upstream, config: HealthConfig):
        super().__init__(backends, config.interval_s)
        self.upstream = upstream
        self.config = config
        self.mismatched: set[str] = set()
        """URLs of backends that serve a different model than the rest."""

    async def visit(self, backend: Backend) -> bool:
        try:
            status, _ = await self.upstream.get_text(
                backend.url + "/health", timeout_s=self.config.timeout_s
            )
            ok = status == 200
        except PdlbError:
            ok = False
        if ok and backend.models is None:
            ok = await self._check_models(backend)
        if ok:
            self.report_success(backend)
        else:
            self.report_failure(backend)
        return ok

    async def _check_models(self, backend: Backend) -> bool:
        """Both pools must serve the same model(s): a decode fed KV computed by another
        model answers 200 with garbage. The first backend to answer sets the reference; a
        backend that serves something else never enters rotation (and says why, loudly)."""
        try:
            answer = await self.upstream.get_json(backend.url + "/v1/models",
                                                  timeout_s=self.config.timeout_s)
            ids = frozenset(m["id"] for m in answer["data"] if isinstance(m.get("id"), str))
        except (PdlbError, KeyError, TypeError, AttributeError):
            return True  # a server without /v1/models: nothing to compare, not a failure
        known = [b.models for b in self.backends if b.models is not None and b is not backend]
        if known and ids != known[0]:
            if backend.healthy or backend.consecutive_failures == 0:
                log.error("%s serves %s but the other backends serve %s: kept out of rotation",
                          backend, sorted(ids), sorted(known[0]))
            self.mismatched.add(backend.url)
            backend.healthy = False
            return False
        backend.models = ids
        self.mismatched.discard(backend.url)
        return True

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
