"""Per-request records: what one request did, on the client's clock.

A record holds raw observations only (times, token counts from the server's ``usage``,
errors). Every metric in the report is computed from records by :mod:`loadgen.metrics`, so a
records file is enough to recompute any past run.

Times are seconds. ``scheduled`` and ``sent`` are offsets from the run's time zero (the first
scheduled send); ``chunk_times`` are offsets from ``sent`` of every chunk that carried
generated output, and ``chunk_tokens`` the tokens each of those chunks carried (from
``stream_options.continuous_usage_stats``; ``None`` when the server did not report them).
``finished`` is the offset from ``sent`` at which the response ended (success or failure).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson

RECORD_FIELDS = (
    "index", "worker", "session", "turn", "group", "scheduled", "sent", "queue_wait",
    "finished", "ok", "status", "error", "chunk_times", "chunk_tokens", "prompt_tokens",
    "output_tokens", "cached_tokens", "expected_input_len", "max_tokens",
)


@dataclass(slots=True)
class Record:
    """One request's observations. Build with the client; never compute metrics here."""

    index: int
    scheduled: float
    worker: int = 0
    session: int | None = None
    turn: int = 0
    group: int | None = None
    sent: float | None = None
    queue_wait: float = 0.0
    finished: float | None = None
    ok: bool = False
    status: int | None = None
    error: str | None = None
    chunk_times: Sequence[float] = field(default_factory=list)  # array('d') when live
    chunk_tokens: Sequence[int] | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    expected_input_len: int | None = None
    max_tokens: int | None = None

    # Derived views (cheap; used by metrics and the progress line) ------------------------
    @property
    def ttft(self) -> float | None:
        """Send → first output-bearing chunk, seconds."""
        return self.chunk_times[0] if self.ok and self.chunk_times else None

    @property
    def e2el(self) -> float | None:
        """Send → last output-bearing chunk, seconds."""
        return self.chunk_times[-1] if self.ok and self.chunk_times else None

    @property
    def schedule_lag(self) -> float | None:
        """How late the client sent, not counting a deliberate wait for a concurrency slot."""
        if self.sent is None:
            return None
        return self.sent - self.scheduled - self.queue_wait

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in RECORD_FIELDS}
        for key in ("chunk_times", "chunk_tokens"):
            if isinstance(out[key], array):
                out[key] = out[key].tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown record field(s): {sorted(unknown)}")
        if "index" not in data or "scheduled" not in data:
            raise ValueError("a record needs at least 'index' and 'scheduled'")
        return cls(**data)


def write_jsonl(records: Iterable[Record], path: str | Path) -> None:
    """Write one JSON object per line."""
    with open(path, "wb") as fh:
        for rec in records:
            fh.write(orjson.dumps(rec.to_dict()))
            fh.write(b"\n")


def iter_jsonl(path: str | Path) -> Iterator[Record]:
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield Record.from_dict(orjson.loads(line))
            except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: bad record: {exc}") from exc


def read_jsonl(path: str | Path) -> list[Record]:
    return list(iter_jsonl(path))
