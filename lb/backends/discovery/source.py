"""A discovery source, and the loop that runs one: the last good set, errors, backoff.

A :class:`Source` knows how to ask one place (DNS, the Kubernetes API) which backends exist:
``sets()`` yields the whole set of backend URLs each time it may have changed, and raises
:class:`DiscoveryError` when the place cannot answer. :class:`Runner` drives it and owns the
rules every kind shares:

- a source that fails keeps its **last good set** — a failure never empties a pool; only a
  source that answered (an NXDOMAIN, zero Ready pods) can say "no backends";
- every failure is counted, the first of a streak is logged (one WARNING, with the reason),
  its end too (one INFO); the next try waits 0.5 s, doubling up to the source's
  ``backoff_max_s``, and a good answer resets the wait;
- a changed set is handed to ``on_change`` (the fleet merges it into the pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

log = logging.getLogger("pdlb.discovery")

FIRST_RETRY_S = 0.5


class DiscoveryError(Exception):
    """A source could not answer (timeout, refused, an HTTP error, a malformed reply). Never
    reaches a client: the runner counts it and keeps the last good set."""


class Source(ABC):
    """One place backends come from."""

    backoff_max_s: float = 30.0
    """The longest wait between two tries after failures."""

    @abstractmethod
    def sets(self) -> AsyncGenerator[frozenset[str], None]:
        """Yield the full set of backend URLs (``scheme://address:port``) each time it may
        have changed; raise :class:`DiscoveryError` when the source cannot answer. The
        runner calls it again after a failure (or if it ends)."""

    def details(self) -> dict[str, Any]:
        """Kind-specific status for /admin/state (a watch's resourceVersion, say)."""
        return {}

    async def aclose(self) -> None:  # noqa: B027 - optional, most sources hold nothing
        """Release what the source holds (an HTTP session); nothing by default."""


class Runner:
    """Runs one source for one pool, remembering its last good set."""

    def __init__(self, pool: str, label: str, kind: str, source: Source,
                 on_change: Callable[[Runner], None],
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.pool = pool
        self.label = label
        """The ``source`` label of its metrics (``dns:NAME``, ``kubernetes:NS/SELECTOR``)."""
        self.kind = kind
        self.source = source
        self.on_change = on_change
        self.urls: frozenset[str] | None = None
        """The last good set; None until the source first answered."""
        self.errors = 0
        self.updates = 0
        self.failing: str | None = None
        """The error of the current failure streak; None while the source answers."""
        self.last_error: str | None = None
        self.last_success: float | None = None
        self.answered = asyncio.Event()
        """Set once the source has answered or failed for the first time."""
        self._task: asyncio.Task[None] | None = None
        self._sleep = sleep  # the wait between tries (the tests record it)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(),
                                             name=f"pdlb-discovery {self.pool} {self.label}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.source.aclose()

    def status(self) -> dict[str, Any]:
        state = ("failing" if self.failing is not None else
                 "starting" if self.urls is None else "ok")
        return {
            "source": self.label, "kind": self.kind, "state": state,
            "backends": None if self.urls is None else sorted(self.urls),
            "errors": self.errors, "updates": self.updates, "last_error": self.last_error,
            "last_success_s_ago": (None if self.last_success is None
                                   else round(time.monotonic() - self.last_success, 3)),
            **self.source.details(),
        }

    async def _run(self) -> None:
        wait = min(FIRST_RETRY_S, self.source.backoff_max_s)
        while True:
            try:
                async with contextlib.aclosing(self.source.sets()) as sets:
                    async for urls in sets:
                        self._answered(urls)
                        wait = min(FIRST_RETRY_S, self.source.backoff_max_s)
            except DiscoveryError as exc:
                self._failed(str(exc))
            except Exception as exc:  # a bug in a source: said with its traceback, and retried
                log.exception("%s pool: discovery %s raised", self.pool, self.label)
                self._failed(f"{type(exc).__name__}: {exc}")
            await self._sleep(wait)
            wait = min(wait * 2, self.source.backoff_max_s)

    def _answered(self, urls: frozenset[str]) -> None:
        self.last_success = time.monotonic()
        if self.failing is not None:
            log.info("%s pool: discovery %s answers again", self.pool, self.label)
            self.failing = None
        self.answered.set()
        if urls == self.urls:
            return
        if not urls and self.urls:
            log.warning("%s pool: discovery %s answered with no backends (the source works:"
                        " its %d backend(s) are gone)", self.pool, self.label, len(self.urls))
        self.urls = urls
        self.updates += 1
        self.on_change(self)

    def _failed(self, error: str) -> None:
        self.errors += 1
        self.last_error = error
        self.answered.set()
        if self.failing is None:
            kept = "nothing yet" if self.urls is None else f"its last {len(self.urls)} backend(s)"
            log.warning("%s pool: discovery %s failed: %s; keeping %s, retrying (every %g s at"
                        " most)", self.pool, self.label, error, kept, self.source.backoff_max_s)
        else:
            log.debug("%s pool: discovery %s still failing: %s", self.pool, self.label, error)
        self.failing = error
