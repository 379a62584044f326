"""Live progress: counters the runner keeps, and the one-line printer."""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TextIO

from loadgen.metrics import percentile

ROLLING_WINDOW_S = 5.0


@dataclass(slots=True)
class Progress:
    """A snapshot for the progress line (times in seconds since time zero)."""

    elapsed: float
    sent: int
    done: int
    failed: int
    in_flight: int
    send_rate: float
    p99_ttft_ms: float | None
    p99_lag_ms: float | None
    planned: int | None = None


ProgressCallback = Callable[[Progress], None]


@dataclass
class Counters:
    """Updated by the runner on every send/finish (a few integer updates; included in the
    client CPU that docs/loadgen.md measured)."""

    sent: int = 0
    done: int = 0
    failed: int = 0
    ttfts: deque[tuple[float, float]] = field(default_factory=deque)
    lags: deque[tuple[float, float]] = field(default_factory=deque)
    _last_sent: int = 0
    _last_t: float = 0.0

    def on_done(self, now: float, ok: bool, ttft: float | None, lag: float | None) -> None:
        self.done += 1
        if lag is not None:
            self.lags.append((now, lag))
        if not ok:
            self.failed += 1
        elif ttft is not None:
            self.ttfts.append((now, ttft))

    def snapshot(self, now: float, planned: int | None = None) -> Progress:
        horizon = now - ROLLING_WINDOW_S
        for dq in (self.ttfts, self.lags):
            while dq and dq[0][0] < horizon:
                dq.popleft()
        dt = now - self._last_t
        rate = (self.sent - self._last_sent) / dt if dt > 0 else 0.0
        self._last_sent, self._last_t = self.sent, now
        return Progress(
            elapsed=now, sent=self.sent, done=self.done, failed=self.failed,
            in_flight=self.sent - self.done, send_rate=rate,
            p99_ttft_ms=_p99_ms(v for _, v in self.ttfts),
            p99_lag_ms=_p99_ms(v for _, v in self.lags), planned=planned,
        )


def _p99_ms(values: Iterable[float]) -> float | None:
    vals = sorted(values)
    return percentile(vals, 99.0) * 1000.0 if vals else None


def merge(snaps: Iterable[Progress]) -> Progress:
    """Combine the workers' snapshots (p99s: the worst worker's, an upper bound)."""
    snaps = list(snaps)
    def worst(xs: Iterable[float | None]) -> float | None:
        vals = [x for x in xs if x is not None]
        return max(vals) if vals else None
    planned = [s.planned for s in snaps]
    return Progress(
        elapsed=max((s.elapsed for s in snaps), default=0.0),
        sent=sum(s.sent for s in snaps), done=sum(s.done for s in snaps),
        failed=sum(s.failed for s in snaps), in_flight=sum(s.in_flight for s in snaps),
        send_rate=sum(s.send_rate for s in snaps),
        p99_ttft_ms=worst(s.p99_ttft_ms for s in snaps),
        p99_lag_ms=worst(s.p99_lag_ms for s in snaps),
        planned=None if any(p is None for p in planned) else sum(p or 0 for p in planned),
    )


def format_line(p: Progress) -> str:
    def ms(v: float | None) -> str:
        return f"{v:7.1f}ms" if v is not None else "      - "
    total = f"/{p.planned}" if p.planned is not None else ""
    return (f"[{p.elapsed:6.1f}s] sent {p.sent}{total}  {p.send_rate:7.1f} req/s  "
            f"in-flight {p.in_flight:5d}  done {p.done}  errors {p.failed}  "
            f"p99 TTFT(5s) {ms(p.p99_ttft_ms)}  p99 lag(5s) {ms(p.p99_lag_ms)}")


class LinePrinter:
    """Rewrites one line on a terminal; prints a line every 5 s when not a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last = -1e9

    def __call__(self, p: Progress) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + format_line(p))
            self.stream.flush()
        elif p.elapsed - self._last >= 5.0:
            self._last = p.elapsed
            self.stream.write(format_line(p) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
