"""Admission control: per-stage token budgets, one bounded FIFO wait queue, fast rejection.

A request needs room in BOTH stages before it is admitted: prefill (its prompt tokens, held
until its prefill leg ends) and decode (prompt + max new tokens, held until its stream ends).
Reserving the decode share up front is the rate matching: when decode is the bottleneck, new
prefills wait instead of piling up finished prefills whose KV leases expire while they wait for
a decode slot.

Waiting is FIFO across stages (a small request never overtakes a big one, so nothing starves),
or — with ``[tenants]`` — ordered by priority class, aging and tenants' fair shares
(lb/tenants/fairqueue.py: same head-of-line rule, and a full line may shed a lower class's
or an over-share tenant's newest waiter, 429 ``shed``, to make room),
bounded by the blocking stage's ``max_queue`` (beyond it: 429 at once) and by its
``queue_timeout_s`` (then: 503). Both answers carry Retry-After and name the stage. A request
larger than a stage's whole budget can never be admitted and gets 413 immediately.

Shared budgets (``[cluster]``): a :class:`BudgetStore` (lb/backends/cluster.py, on Redis)
holds every replica's reservations, and the budgets are global. While the store answers, a
request is admitted by one atomic reservation there; one that finds a stage full waits
(bounded by the same ``max_queue`` / ``queue_timeout_s``), FIFO on this replica: the head of
the line retries when this replica releases tokens or every ``poll_ms``, whichever comes
first; across replicas the lines are not ordered with each other. While the store does not
answer, admission runs on this replica's own accounting with each budget divided by the
configured replica count, and the store is told this replica's whole holdings when it
answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from lb.config import PoolConfig
from lb.errors import Overloaded, PayloadTooLarge
from lb.metrics import Metrics
from lb.tenants.config import TenancyConfig
from lb.tenants.fairqueue import FairQueue, Flow

STAGES = ("prefill", "decode")


class StoreUnavailable(Exception):
    """The shared budget store did not answer (in time); admission goes on locally."""


class BudgetStore(Protocol):
    """Where the stages' budgets are shared with other replicas (lb/backends/cluster.py)."""

    @property
    def shared(self) -> bool:
        """True while the store answers and holds this replica's reservations."""
        ...

    @property
    def replicas(self) -> int:
        """How many replicas share the budgets (the local share is budget / replicas)."""
        ...

    @property
    def poll_s(self) -> float:
        """How often a request waiting for other replicas' tokens asks again."""
        ...

    def follow(self, held: Callable[[], Mapping[str, int]]) -> None:
        """What this replica holds per stage, for the store to rebuild its share from."""

    async def reserve(self, need: Mapping[str, int],
                      limits: Mapping[str, int | None]) -> str | None:
        """Reserve ``need`` atomically if every stage's global sum stays within its limit:
        None when reserved, else the first full stage. Raises :class:`StoreUnavailable`."""
        ...

    def adjust(self, deltas: Mapping[str, int]) -> None:
        """Add (or, negative, give back) tokens outside :meth:`reserve`; never blocks."""


class _PoolNamedStore:
    """A ``[models]`` group's view of the shared store: its stages are named there by its
    pools' names (``<model>/prefill``), so several model groups share one store (one Redis)
    without mixing their budgets. The top-level pools' admission uses the store as it is."""

    __slots__ = ("_back", "_names", "_store")

    def __init__(self, store: BudgetStore, names: Mapping[str, str]) -> None:
        self._store = store
        self._names = dict(names)
        self._back = {v: k for k, v in names.items()}

    @property
    def shared(self) -> bool:
        return self._store.shared

    @property
    def replicas(self) -> int:
        return self._store.replicas

    @property
    def poll_s(self) -> float:
        return self._store.poll_s

    def _named(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return {self._names[k]: v for k, v in values.items()}

    def follow(self, held: Callable[[], Mapping[str, int]]) -> None:
        self._store.follow(lambda: self._named(held()))

    async def reserve(self, need: Mapping[str, int],
                      limits: Mapping[str, int | None]) -> str | None:
        full = await self._store.reserve(self._named(need), self._named(limits))
        return None if full is None else self._back.get(full, full)

    def adjust(self, deltas: Mapping[str, int]) -> None:
        self._store.adjust(self._named(deltas))


@dataclass(slots=True)
class _Stage:
    name: str
    limit: int | None
    max_queue: int
    queue_timeout_s: float
    admitted: int = 0
    waiting: int = 0

    def fits(self, tokens: int) -> bool:
        return self.limit is None or self.admitted + tokens <= self.limit


@dataclass(slots=True)
class _Waiter:
    need: dict[str, int]
    blocked_on: str
    flow: Flow | None = None
    future: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Ticket:
    """What an admitted request holds; releasing it (stage by stage, or all) admits others."""

    __slots__ = ("_admission", "_held", "_then")

    def __init__(self, admission: Admission, need: dict[str, int]) -> None:
        self._admission = admission
        self._held = dict(need)
        self._then: AbstractContextManager[object] | None = None

    def then(self, done: AbstractContextManager[object]) -> None:
        """Exit ``done`` too when this ticket is exited (a tenant's grant, lb/tenants/)."""
        self._then = done

    def resize(self, stage: str, tokens: int) -> None:
        """Correct a stage's charge (e.g. the prefill's real prompt_tokens); may exceed budget
        briefly — the estimate was wrong, the tokens are already on the backend."""
        if stage in self._held:
            delta = tokens - self._held[stage]
            self._admission._stages[stage].admitted += delta
            self._held[stage] = tokens
            self._admission._tell_store({stage: delta})
            self._admission._wake()

    def release(self, stage: str | None = None) -> None:
        """Release one stage's share, or everything still held (idempotent)."""
        stages = [stage] if stage is not None else list(self._held)
        given: dict[str, int] = {}
        for name in stages:
            tokens = self._held.pop(name, None)
            if tokens is not None:
                self._admission._stages[name].admitted -= tokens
                given[name] = -tokens
        if given:
            self._admission._tell_store(given)
        self._admission._wake()

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
        if self._then is not None:
            self._then.__exit__(et, e, tb)


class Admission:
    def __init__(self, pools: Mapping[str, PoolConfig], metrics: Metrics,
                 store: BudgetStore | None = None, tenancy: TenancyConfig | None = None) -> None:
        self._stages = {
            name: _Stage(name, pools[name].max_inflight_tokens, pools[name].max_queue,
                         pools[name].queue_timeout_s)
            for name in STAGES
        }
        self._labels = {name: pools[name].name for name in STAGES}
        """Each stage's ``stage`` label: its pool's name (``<model>/prefill`` for a
        ``[models]`` model's admission)."""
        self._queue: deque[_Waiter] | FairQueue[_Waiter] = (
            FairQueue(len(tenancy.classes), tenancy.aging_s)
            if tenancy is not None and tenancy.enabled else deque())
        self._auto = any(pools[name].auto_budget for name in STAGES)
        self._metrics = metrics
        for name, stage in self._stages.items():
            label = self._labels[name]
            metrics.watch("pdlb_admission_queue_depth", "Requests waiting for a stage's budget.",
                          {"stage": label}, lambda s=stage: s.waiting)  # type: ignore[misc]
            metrics.watch("pdlb_admitted_tokens", "Tokens admitted and not yet released, per"
                          " stage.", {"stage": label}, lambda s=stage: s.admitted)  # type: ignore[misc]
            metrics.watch("pdlb_admission_budget_tokens", "Token budget per stage (-1 ="
                          " unlimited).", {"stage": label},
                          lambda s=stage: -1 if s.limit is None else s.limit)  # type: ignore[misc]
        self._wait_hist = {n: metrics.queue_wait.labels(stage=self._labels[n]) for n in STAGES}
        if store is not None and any(k != v for k, v in self._labels.items()):
            store = _PoolNamedStore(store, self._labels)
        self._store = store
        self._released = asyncio.Event()
        """Set (and replaced) whenever this replica gives tokens back: shared waiters retry."""
        self._shared_turn = asyncio.Lock()
        """Held by the head of this replica's line for the shared budget (asyncio's lock
        is FIFO)."""
        self._shared_blocked: str | None = None
        """The stage the head of that line last found full."""
        self._shared_line: FairQueue[_Waiter] | None = (
            FairQueue(len(tenancy.classes), tenancy.aging_s)
            if store is not None and tenancy is not None and tenancy.enabled else None)
        """With tenants, this replica's line for the shared budget, ordered as the local one."""
        if store is not None:
            store.follow(lambda: {n: s.admitted for n, s in self._stages.items()})

    def set_limit(self, stage: str, limit: int | None) -> None:
        """A new budget for one stage (from scraped KV capacity); waiters re-check."""
        if self._stages[stage].limit != limit:
            self._stages[stage].limit = limit
            self._wake()

    def reconfigure(self, pools: Mapping[str, PoolConfig]) -> None:
        """Adopt new budgets and queue settings (hot reload); waiters re-check at once."""
        for name, stage in self._stages.items():
            stage.limit = pools[name].max_inflight_tokens
            stage.max_queue = pools[name].max_queue
            stage.queue_timeout_s = pools[name].queue_timeout_s
        self._auto = any(pools[name].auto_budget for name in STAGES)
        self._wake()

    def has_budget(self) -> bool:
        """Whether any stage has a token budget (configured, or scraped for "auto")."""
        return any(s.limit is not None for s in self._stages.values()) or self._auto

    def admitted_tokens(self, stage: str) -> int:
        return self._stages[stage].admitted

    def _blocking(self, need: dict[str, int]) -> str | None:
        divisor = 1 if self._store is None else self._store.replicas
        for name, tokens in need.items():
            stage = self._stages[name]
            if divisor > 1 and stage.limit is not None:  # this replica's share
                if stage.admitted + tokens > max(1, stage.limit // divisor):
                    return name
            elif not stage.fits(tokens):
                return name
        return None

    def _tell_store(self, deltas: dict[str, int]) -> None:
        if self._store is None:
            return  # no shared budget: no shared waiters to wake, nothing to tell
        self._store.adjust(deltas)
        if any(d < 0 for d in deltas.values()):
            self._kick()

    def _take(self, need: dict[str, int]) -> None:
        for name, tokens in need.items():
            self._stages[name].admitted += tokens

    def _wake(self) -> None:
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # timed out or cancelled; already uncounted
                self._queue.popleft()
                continue
            blocked = self._blocking(head.need)
            if blocked is not None:
                if blocked != head.blocked_on:
                    self._stages[head.blocked_on].waiting -= 1
                    self._stages[blocked].waiting += 1
                    head.blocked_on = blocked
                return
            self._queue.popleft()
            self._stages[head.blocked_on].waiting -= 1
            self._take(head.need)
            head.future.set_result(None)

    def _reject(self, stage: str, reason: str, status: int, message: str) -> Overloaded:
        self._metrics.rejections.labels(stage=self._labels[stage], reason=reason).inc()
        return Overloaded(message, stage=self._labels[stage], reason=reason, status=status,
                          retry_after_s=max(1.0, self._stages[stage].queue_timeout_s / 4))

    async def admit(self, prefill_tokens: int, decode_tokens: int,
                    flow: Flow | None = None) -> Ticket:
        """``flow``: whose request it is (``[tenants]``), for the fair line's order."""
        need = {"prefill": prefill_tokens, "decode": decode_tokens}
        for name, tokens in need.items():
            limit = self._stages[name].limit
            if limit is not None and tokens > limit:
                self._metrics.rejections.labels(stage=self._labels[name], reason="too_large").inc()
                raise PayloadTooLarge(
                    f"request needs {tokens} {name} tokens but the {self._labels[name]} pool's"
                    " budget is"
                    f" {limit} (max_inflight_tokens); shorten the prompt or max_tokens",
                    code="request_too_large",
                )
        store = self._store
        while True:
            if store is not None and store.shared:
                try:
                    if self._shared_line is not None and flow is not None:
                        return await self._admit_shared_fair(store, need, flow,
                                                             self._shared_line)
                    return await self._admit_shared(store, need)
                except StoreUnavailable:
                    pass  # the store said so (metric, one log line): this replica's share
            ticket = await self._admit_local(need, flow)
            if store is None or not store.shared:
                if store is not None:
                    store.adjust(need)  # kept for when the store answers again
                return ticket
            # The store came back while this request waited locally: ask it instead.
            for name, tokens in need.items():
                self._stages[name].admitted -= tokens
            self._wake()

    async def _admit_shared(self, store: BudgetStore, need: dict[str, int]) -> Ticket:
        """One atomic reservation in the store. A request that finds a stage full waits its
        turn (FIFO on this replica, bounded by ``max_queue`` and ``queue_timeout_s``): only
        the head of the line asks the store again, when this replica releases tokens or
        every ``poll_s`` — one call per replica per interval, however many wait."""
        turn = self._shared_turn
        blocked: str | None = self._shared_blocked
        if not turn.locked():  # nobody waiting here: try at once
            blocked = await self._reserve(store, need, self._limits())
            if blocked is None:
                return self._shared_ticket(need)
        stage = self._stages[blocked or "decode"]
        if stage.waiting >= stage.max_queue:
            raise self._reject(stage.name, "queue_full", 429,
                               f"{self._labels[stage.name]} stage saturated and its wait"
                               " queue is full"
                               f" ({stage.max_queue}); retry later")
        stage.waiting += 1
        started = time.monotonic()
        try:
            async with asyncio.timeout(stage.queue_timeout_s), turn:
                while True:
                    blocked = await self._reserve(store, need, self._limits())
                    if blocked is None:
                        break
                    self._shared_blocked = blocked
                    released = self._released
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(released.wait(), store.poll_s)
        except TimeoutError:
            raise self._reject(
                stage.name, "queue_timeout", 503,
                f"{self._labels[stage.name]} stage saturated: no room within"
                f" {stage.queue_timeout_s:g} s; retry later") from None
        finally:
            stage.waiting -= 1
        self._wait_hist[stage.name].observe(time.monotonic() - started)
        return self._shared_ticket(need)

    async def _admit_shared_fair(self, store: BudgetStore, need: dict[str, int], flow: Flow,
                                 line: FairQueue[_Waiter]) -> Ticket:
        """:meth:`_admit_shared` with tenants: the line is the fair one (classes, aging,
        shares; a full one may shed), and only its head asks the store — when this replica
        releases tokens, when the line changes, or every ``poll_s``."""
        blocked: str | None = self._shared_blocked
        if not line:
            blocked = await self._reserve(store, need, self._limits())
            if blocked is None:
                return self._shared_ticket(need)
        stage = self._stages[blocked or "decode"]
        if stage.waiting >= stage.max_queue and not self._shed(stage, flow, line):
            raise self._reject(stage.name, "queue_full", 429,
                               f"{self._labels[stage.name]} stage saturated and its wait"
                               " queue is full"
                               f" ({stage.max_queue}); retry later")
        waiter = _Waiter(need, stage.name, flow)
        line.append(waiter)
        stage.waiting += 1
        started = time.monotonic()
        try:
            async with asyncio.timeout(stage.queue_timeout_s):
                while True:
                    if waiter.future.done():
                        waiter.future.result()  # shed by a later arrival: raises its 429
                    kick = self._released
                    if line[0] is waiter:
                        blocked = await self._reserve(store, need, self._limits())
                        if blocked is None:
                            break
                        self._shared_blocked = blocked
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(kick.wait(), store.poll_s)
            if waiter.future.done():  # shed while its reservation went through: it is in
                waiter.future.exception()
        except TimeoutError:
            raise self._reject(
                stage.name, "queue_timeout", 503,
                f"{self._labels[stage.name]} stage saturated: no room within"
                f" {stage.queue_timeout_s:g} s; retry later") from None
        finally:
            if not waiter.future.done():  # (a shed one is out of the line and uncounted)
                line.remove(waiter)
                stage.waiting -= 1
                self._kick()  # a new head asks at once
        self._wait_hist[stage.name].observe(time.monotonic() - started)
        return self._shared_ticket(need)

    def _kick(self) -> None:
        """Wake every request waiting for the shared budget on this replica."""
        self._released.set()
        self._released = asyncio.Event()

    def _limits(self) -> dict[str, int | None]:
        return {name: s.limit for name, s in self._stages.items()}

    async def _reserve(self, store: BudgetStore, need: dict[str, int],
                       limits: dict[str, int | None]) -> str | None:
        """The store's answer; if this request is cancelled meanwhile, a reservation that
        went through is given back."""
        call = asyncio.ensure_future(store.reserve(need, limits))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            def undo(done: asyncio.Future[str | None]) -> None:
                if not done.cancelled() and done.exception() is None and done.result() is None:
                    store.adjust({name: -tokens for name, tokens in need.items()})
            call.add_done_callback(undo)
            raise

    def _shared_ticket(self, need: dict[str, int]) -> Ticket:
        self._take(need)  # this replica's view; the store already counts it
        return Ticket(self, need)

    async def _admit_local(self, need: dict[str, int], flow: Flow | None = None) -> Ticket:
        blocked = None if self._queue else self._blocking(need)
        if blocked is None and not self._queue:
            self._take(need)
            return Ticket(self, need)
        blocked = blocked or self._blocking(need) or self._queue[-1].blocked_on
        stage = self._stages[blocked]
        if stage.waiting >= stage.max_queue and not self._shed(stage, flow, self._queue):
            raise self._reject(blocked, "queue_full", 429,
                               f"{self._labels[blocked]} stage saturated and its wait queue is full"
                               f" ({stage.max_queue}); retry later")
        waiter = _Waiter(need, blocked, flow)
        self._queue.append(waiter)
        stage.waiting += 1
        if flow is not None:
            self._wake()  # a higher class may fit where the head did not
        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), stage.queue_timeout_s)
        except BaseException as exc:
            if waiter.future.done() and not waiter.future.cancelled() and isinstance(
                    exc, Overloaded) and exc is waiter.future.exception():
                raise  # shed by a later arrival: already out of the line and uncounted
            if waiter.future.done() and not waiter.future.cancelled():
                # Admitted at the very moment we gave up: hand the tokens back.
                Ticket(self, need).release()
            else:
                waiter.future.cancel()
                self._stages[waiter.blocked_on].waiting -= 1
                self._wake()
            if isinstance(exc, TimeoutError):
                raise self._reject(
                    waiter.blocked_on, "queue_timeout", 503,
                    f"{self._labels[waiter.blocked_on]} stage saturated: no room within"
                    f" {stage.queue_timeout_s:g} s; retry later",
                ) from None
            raise
        self._wait_hist[blocked].observe(time.monotonic() - started)
        return Ticket(self, need)

    def _shed(self, stage: _Stage, flow: Flow | None,
              line: deque[_Waiter] | FairQueue[_Waiter]) -> bool:
        """Make room in ``stage``'s full line for an arrival of ``flow`` by pushing out
        the waiter the fair line names (lb/tenants/fairqueue.py); False: nobody."""
        if flow is None or not isinstance(line, FairQueue):
            return False
        victim = line.victim(flow, stage.name)
        if victim is None:
            return False
        line.remove(victim)
        self._stages[victim.blocked_on].waiting -= 1
        victim.future.set_exception(self._reject(
            victim.blocked_on, "shed", 429,
            f"{self._labels[victim.blocked_on]} stage saturated: this request"
            " was pushed out of the wait queue by one of a higher priority class or of a"
            " tenant under its fair share; retry later"))
        if line is self._shared_line:
            self._kick()  # the victim leaves its wait at once
        return True
