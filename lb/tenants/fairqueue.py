"""Admission's wait line with tenants: priority classes, aging, and fair shares by tokens.

Which waiting request is admitted next (the line's head, :meth:`FairQueue.head`):

1. **Classes** (``[tenancy] classes``, highest first): the head of a higher class goes
   before any of a lower one.
2. **Aging** (the documented starvation bound): a request's class rises by one for every
   ``aging_s`` it has waited. Once a lower class's head has waited ``aging_s`` × (how many
   classes it is below), it competes as the top class, and among equal classes the one that
   arrived first goes first — so no line is passed over for longer than that, however much
   higher-class traffic keeps arriving (its requests after that point queue behind it).
3. **Fair queuing inside a class** — start-time fair queuing (Goyal et al., SFQ) with a
   request's cost = its decode tokens (prompt + max_tokens): each tenant's requests get
   virtual start tags ``S = max(V, F_tenant)``, ``F_tenant = S + cost / weight``, the
   smallest ``S`` is admitted and ``V`` becomes it. A tenant that floods the line only
   lengthens its own tags: another tenant's next request starts at ``V`` and is admitted
   after at most one request of each other tenant per unit of its own share. An idle tenant
   earns no credit (``max(V, ...)``).

Head-of-line blocking is kept: when the head does not fit, nothing behind it is admitted
(as in the FIFO line), so a big request is never starved by small ones.

When a stage's line is full, :meth:`FairQueue.victim` names whom a new arrival may push
out: the newest request of a lower class, else — in the arrival's class — the newest of
the tenant holding the most places per unit of weight, if that is more than the arrival's
tenant would hold with it. A flood thus fills the line only up to its share and is shed
first; it cannot lock others out with ``queue_full``.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


@dataclass(frozen=True, slots=True)
class Flow:
    """Whose a waiting request is: tenant name, class (0 = highest) and weight."""

    tenant: str
    level: int = 0
    weight: float = 1.0


class Waiting(Protocol):
    """What the line needs of admission's waiters (lb/admission.py ``_Waiter``)."""

    need: dict[str, int]
    blocked_on: str
    future: asyncio.Future[None]
    flow: Flow | None


_ANONYMOUS = Flow("anonymous")
W = TypeVar("W", bound=Waiting)


class _Entry(Generic[W]):
    __slots__ = ("flow", "seq", "since", "tag", "waiter")

    def __init__(self, waiter: W, flow: Flow, tag: float, since: float, seq: int) -> None:
        self.waiter = waiter
        self.flow = flow
        self.tag = tag
        self.since = since
        self.seq = seq


class FairQueue(Generic[W]):
    """The part of ``collections.deque`` admission uses (append, ``[0]``, ``[-1]``,
    popleft, len), ordered as the module says, plus :meth:`victim` and :meth:`remove`."""

    def __init__(self, classes: int, aging_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lines: list[dict[str, deque[_Entry[W]]]] = [{} for _ in range(classes)]
        self._vtime = [0.0] * classes
        self._finish: list[dict[str, float]] = [{} for _ in range(classes)]
        self._aging_s = aging_s
        self._clock = clock
        self._seq = itertools.count()
        self._count = 0
        self._last: W | None = None
        self._head: _Entry[W] | None = None

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def append(self, waiter: W) -> None:
        flow = waiter.flow or _ANONYMOUS
        level = min(flow.level, len(self._lines) - 1)
        cost = max(1, waiter.need.get("decode", 0))
        start = max(self._vtime[level], self._finish[level].get(flow.tenant, 0.0))
        self._finish[level][flow.tenant] = start + cost / flow.weight
        entry = _Entry(waiter, flow, start, self._clock(), next(self._seq))
        self._lines[level].setdefault(flow.tenant, deque()).append(entry)
        self._count += 1
        self._last = waiter
        self._head = None

    def __getitem__(self, index: int) -> W:
        if not self._count:
            raise IndexError("the line is empty")
        if index == 0:
            self._head = self._pick()
            return self._head.waiter
        if index == -1:
            if self._last is None:  # the newest was removed: find the newest left
                newest = max((line[-1] for lines in self._lines for line in lines.values()),
                             key=lambda e: e.seq)
                self._last = newest.waiter
            return self._last
        raise IndexError(index)

    def popleft(self) -> W:
        entry = self._head or self._pick()
        self._head = None
        self._drop(entry)
        level = min(entry.flow.level, len(self._lines) - 1)
        self._vtime[level] = max(self._vtime[level], entry.tag)
        return entry.waiter

    def remove(self, waiter: W) -> None:
        for lines in self._lines:
            for line in lines.values():
                for entry in line:
                    if entry.waiter is waiter:
                        self._head = None
                        self._drop(entry)
                        return

    def victim(self, flow: Flow, stage: str) -> W | None:
        """Whom an arrival of ``flow`` may push out of ``stage``'s full line (None: nobody;
        the arrival is refused instead)."""
        lower: _Entry[W] | None = None
        held: dict[str, list[_Entry[W]]] = {}
        for level, lines in enumerate(self._lines):
            for line in lines.values():
                for entry in line:
                    w = entry.waiter
                    if w.future.done() or w.blocked_on != stage:
                        continue
                    if level > flow.level:
                        if lower is None or (level, entry.seq) > (
                                min(lower.flow.level, len(self._lines) - 1), lower.seq):
                            lower = entry
                    elif level == flow.level:
                        held.setdefault(entry.flow.tenant, []).append(entry)
        if lower is not None:
            return lower.waiter
        mine = (len(held.get(flow.tenant, ())) + 1) / flow.weight
        worst, most = None, mine
        for tenant, entries in held.items():
            share = len(entries) / entries[0].flow.weight
            if tenant != flow.tenant and share > most:
                worst, most = entries, share
        return None if worst is None else max(worst, key=lambda e: e.seq).waiter

    # -- inside
    def _pick(self) -> _Entry[W]:
        now = self._clock()
        best: _Entry[W] | None = None
        best_key: tuple[int, float] = (0, 0.0)
        for level, lines in enumerate(self._lines):
            head: _Entry[W] | None = None
            for line in lines.values():
                if line and (head is None or line[0].tag < head.tag):
                    head = line[0]
            if head is None:
                continue
            waited = now - head.since
            key = (max(0, level - math.floor(waited / self._aging_s)), head.since)
            if best is None or key < best_key:
                best, best_key = head, key
        if best is None:
            raise IndexError("the line is empty")
        return best

    def _drop(self, entry: _Entry[W]) -> None:
        level = min(entry.flow.level, len(self._lines) - 1)
        lines = self._lines[level]
        line = lines[entry.flow.tenant]
        if line[0] is entry:
            line.popleft()
        else:
            line.remove(entry)
        if not line:
            del lines[entry.flow.tenant]
        self._count -= 1
        if self._last is entry.waiter:
            self._last = None
