"""Active health checks: GET /health on every backend, on an interval, off the request path.

A backend leaves rotation after ``failures_to_eject`` consecutive failed checks and comes
back after ``successes_to_restore`` good ones — never removed forever. Real requests count
too (the proxy calls :meth:`HealthChecker.report_failure` on a connection failure or a 5xx,
and on a prefill's 429; :meth:`HealthChecker.report_success` on an answer), so a dead
backend is ejected between two checks rather than after them. A backend must also serve the
model(s) most backends of its model group serve (``GET /v1/models``: the base models;
LoRA adapters, the entries with a ``parent``, may differ per backend and are recorded for
routing), else it is kept out of rotation. The list is read again every round, so adapters
loaded or unloaded at run time are followed.

A backend added while pdlb runs (a reload, discovery) is *pending*: out of rotation until its
first check — health and model — passes. It is checked at once, not at the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable

from lb.backends.poller import BackendPoller
from lb.backends.pool import Backend
from lb.backends.upstream import Upstream
from lb.config import HealthConfig
from lb.errors import PdlbError

log = logging.getLogger("pdlb.health")


class HealthChecker(BackendPoller):
    name = "pdlb-health"

    def __init__(self, backends: Iterable[Backend], upstream: Upstream, config: HealthConfig):
        super().__init__(backends, config.interval_s)
        self.upstream = upstream
        self.config = config
        self.mismatched: set[str] = set()
        """URLs of backends that serve a different model than the rest."""
        self._served: dict[str, frozenset[str]] = {}
        """The base models each backend last said it serves (GET /v1/models)."""
        self._joining: dict[Backend, asyncio.Task[bool]] = {}
        """The first checks of pending backends, started as soon as they are added."""

    def set_backends(self, backends: Iterable[Backend]) -> None:
        """Follow a changed backend list: forget what removed URLs served, and check each
        pending backend now (once the checker runs; before, the first round does)."""
        super().set_backends(backends)
        urls = {b.url for b in self.backends}
        self._served = {url: ids for url, ids in self._served.items() if url in urls}
        self.mismatched &= urls
        if self._task is None:
            return
        for backend in self.backends:
            if backend.pending and backend not in self._joining:
                task = asyncio.create_task(self.visit(backend),
                                           name=f"pdlb-health-join {backend.url}")
                self._joining[backend] = task
                task.add_done_callback(self._joined(backend))

    def _joined(self, backend: Backend) -> Callable[[asyncio.Task[bool]], None]:
        def forget(_: asyncio.Task[bool]) -> None:
            self._joining.pop(backend, None)
        return forget

    async def joined(self, limit_s: float) -> None:
        """Wait (at most ``limit_s``) for the first checks of the backends pending now."""
        tasks = list(self._joining.values())
        if tasks:
            await asyncio.wait(tasks, timeout=limit_s)

    async def stop(self) -> None:
        for task in list(self._joining.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await super().stop()

    async def visit(self, backend: Backend) -> bool:
        try:
            status, _ = await self.upstream.get_text(
                backend.url + "/health", timeout_s=self.config.timeout_s
            )
            ok = status == 200
        except PdlbError:
            ok = False
        if ok:
            ok = await self._check_models(backend)
        if ok and backend.pending:
            backend.pending = False
            backend.healthy = True
            backend.consecutive_failures, backend.consecutive_successes = 0, 1
            log.info("%s backend %s joins the rotation: its first health check passed",
                     backend.pool_name, backend.url)
        elif ok:
            self.report_success(backend)
        else:
            self.report_failure(backend)
        return ok

    async def _check_models(self, backend: Backend) -> bool:
        """Both pools must serve the same model(s): a decode fed KV computed by another
        model answers 200 with garbage. The reference is what most backends serve (ties:
        the backend listed first), so one odd server that answers first cannot shut out
        the rest; a backend that serves something else stays out of rotation (and says
        why, loudly) until it serves the reference."""
        try:
            answer = await self.upstream.get_json(backend.url + "/v1/models",
                                                  timeout_s=self.config.timeout_s)
            cards = [m for m in answer["data"] if isinstance(m.get("id"), str)]
        except (PdlbError, KeyError, TypeError, AttributeError):
            return True  # a server without /v1/models: nothing to compare, not a failure
        ids = frozenset(m["id"] for m in cards if not m.get("parent"))
        adapters = frozenset(m["id"] for m in cards if m.get("parent"))
        if adapters != backend.adapters:
            log.info("%s backend %s serves LoRA adapters %s", backend.pool_name, backend.url,
                     ", ".join(sorted(adapters)) or "(none now)")
            backend.adapters = adapters
        self._served[backend.url] = ids
        if ids != self._reference(backend.group):
            self._keep_out(backend)
            return False
        backend.models = ids
        self.mismatched.discard(backend.url)
        return True

    def after_round(self) -> None:
        """Answers came in any order: once all are in, anyone off the majority goes out."""
        references: dict[str, frozenset[str] | None] = {}
        for backend in self.backends:
            ids = self._served.get(backend.url)
            group = backend.group
            if group not in references:
                references[group] = self._reference(group)
            if ids is not None and ids != references[group] \
                    and backend.url not in self.mismatched:
                self._keep_out(backend)

    def _reference(self, group: str) -> frozenset[str] | None:
        """What most backends of model group ``group`` serve (ties: the one listed first)."""
        members = [b for b in self.backends if b.group == group and b.url in self._served]
        counts = Counter(self._served[b.url] for b in members)
        if not counts:
            return None
        most = max(counts.values())
        return next(self._served[b.url] for b in members if counts[self._served[b.url]] == most)

    def _keep_out(self, backend: Backend) -> None:
        if backend.url not in self.mismatched:
            log.error("%s serves %s but most backends of its model group serve %s: kept out of"
                      " rotation", backend, sorted(self._served[backend.url]),
                      sorted(self._reference(backend.group) or ()))
        self.mismatched.add(backend.url)
        backend.models = None  # checked again every round: it may be restarted right
        backend.healthy = False

    def report_success(self, backend: Backend) -> None:
        backend.consecutive_failures = 0
        backend.consecutive_successes += 1
        restore = self.config.successes_to_restore
        if not backend.healthy and not backend.pending and backend.consecutive_successes >= restore:
            backend.healthy = True
            log.info("%s backend %s is back in rotation after %d good check(s)",
                     backend.pool_name, backend.url, backend.consecutive_successes)

    def report_failure(self, backend: Backend) -> None:
        backend.consecutive_successes = 0
        backend.consecutive_failures += 1
        if backend.healthy and backend.consecutive_failures >= self.config.failures_to_eject:
            backend.healthy = False
            log.warning("%s backend %s taken out of rotation after %d failures in a row"
                        " (health checks or requests); checked again every %g s",
                        backend.pool_name, backend.url, backend.consecutive_failures,
                        self.config.interval_s)
