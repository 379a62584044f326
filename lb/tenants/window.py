"""An exact sliding window: what was taken in the last ``span`` seconds, entry by entry.

A token bucket lets through a full bucket plus a window's refill within one window; fixed
windows let through twice the limit across a boundary. This log is exact: in ANY interval of
``span`` seconds at most ``limit`` is taken (requests: ``limit`` requests; tokens: the
admitted amounts, corrected by :meth:`Window.resize` when the real usage is known). Memory is
one small entry per admission inside the window, which the limit itself bounds.
"""

from __future__ import annotations

from collections import deque


class Entry:
    """One admission's share of a window; ``amount`` may be corrected until it expires."""

    __slots__ = ("amount", "at")

    def __init__(self, at: float, amount: int) -> None:
        self.at = at
        self.amount = amount


class Window:
    __slots__ = ("_log", "_sum", "limit", "span")

    def __init__(self, limit: int, span: float) -> None:
        self.limit = limit
        self.span = span
        self._log: deque[Entry] = deque()
        self._sum = 0

    def _expire(self, now: float) -> None:
        log = self._log
        edge = now - self.span
        while log and log[0].at <= edge:
            self._sum -= log.popleft().amount

    def used(self, now: float) -> int:
        self._expire(now)
        return self._sum

    def wait_s(self, amount: int, now: float) -> float:
        """Seconds until ``amount`` fits (0: now); ``amount`` > limit never fits (inf)."""
        if amount > self.limit:
            return float("inf")
        self._expire(now)
        excess = self._sum + amount - self.limit
        if excess <= 0:
            return 0.0
        for entry in self._log:
            excess -= entry.amount
            if excess <= 0:
                return entry.at + self.span - now
        return self.span  # pragma: no cover - the sum is the log's

    def take(self, amount: int, now: float) -> Entry:
        entry = Entry(now, amount)
        self._log.append(entry)
        self._sum += amount
        return entry

    def resize(self, entry: Entry, amount: int, now: float) -> None:
        """Correct an entry (the real usage); nothing once it left the window."""
        self._expire(now)
        if entry.at > now - self.span:  # still in the log
            self._sum += amount - entry.amount
            entry.amount = amount

    def reset_s(self, now: float) -> float:
        """Seconds until the window is empty again (OpenAI's ``x-ratelimit-reset-*``)."""
        self._expire(now)
        return self._log[-1].at + self.span - now if self._log else 0.0
