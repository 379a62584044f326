"""The SSE side of one streamed answer: split events, decode them, time output chunks.

Transports call :meth:`StreamState.feed` with each read of the response body and the time
it arrived; events split across reads are reassembled. Every event is decoded once with
orjson. A chunk "carries output" when it has text / content / reasoning / tool calls, or when
its cumulative ``usage.completion_tokens`` (continuous_usage_stats) grew.
"""

from __future__ import annotations

from array import array
from typing import Any

import orjson

from loadgen.records import Record


class StreamState:
    """Parsing state of one response stream; :meth:`finish` fills the record."""

    __slots__ = (
        "buf", "cached_tokens", "chat", "error", "finished", "last_arrival", "last_ct",
        "output_tokens",
        "parts", "per_chunk_usage", "prompt_tokens", "t_send", "times", "tokens", "want_text",
    )

    def __init__(self, chat: bool, t_send: float, want_text: bool = False) -> None:
        self.chat = chat
        self.t_send = t_send
        self.want_text = want_text
        self.buf = b""
        self.last_arrival = t_send
        self.times = array("d")   # 8 bytes per chunk, not a 32-byte float object
        self.tokens = array("q")
        self.parts: list[str] = []
        self.per_chunk_usage = False
        self.last_ct = 0
        self.finished = False
        self.error: str | None = None
        self.output_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.cached_tokens: int | None = None

    def feed(self, data: bytes, arrived: float) -> None:
        """One read of the body, received at ``arrived`` (perf_counter seconds)."""
        self.last_arrival = arrived
        now = arrived - self.t_send
        if (not self.buf and data[:6] == b"data: " and data[-2:] == b"\n\n"
                and data.find(b"\n", 6) == len(data) - 2):  # fast path: one whole event
            payload = data[6:-2]
            if payload == b"[DONE]":
                self.finished = True
            else:
                self._event(orjson.loads(payload), now)
            return
        if self.buf:
            data = self.buf + data
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        events = data.split(b"\n\n")
        self.buf = events.pop()
        loads = orjson.loads
        for ev in events:
            if ev[:6] == b"data: " and b"\n" not in ev:
                payload = ev[6:]
            else:
                multi = _data_of(ev)
                if multi is None:
                    continue
                payload = multi
            if payload == b"[DONE]":
                self.finished = True
                continue
            self._event(loads(payload), now)

    def _event(self, obj: Any, now: float) -> None:
        """One decoded event: does it carry output, how many tokens, usage, errors."""
        carries = False
        choices = obj.get("choices")
        if choices:
            c = choices[0]
            if self.chat:
                d = c.get("delta")
                if d:
                    txt = d.get("content") or d.get("reasoning_content") or d.get("reasoning")
                    if txt:
                        carries = True
                        if self.want_text:
                            self.parts.append(txt)
                    elif d.get("tool_calls"):
                        carries = True
            else:
                txt = c.get("text")
                if txt:
                    carries = True
                    if self.want_text:
                        self.parts.append(txt)
            if c.get("finish_reason"):
                self.finished = True
        usage = obj.get("usage")
        ntok = 0
        if usage:
            ct = usage.get("completion_tokens")
            if ct is not None:
                if choices:
                    self.per_chunk_usage = True
                    if ct > self.last_ct:
                        ntok = ct - self.last_ct
                        carries = True
                self.last_ct = ct
                self.output_tokens = ct
            pt = usage.get("prompt_tokens")
            if pt is not None:
                self.prompt_tokens = pt
            details = usage.get("prompt_tokens_details")
            if details:
                self.cached_tokens = details.get("cached_tokens")
        elif "error" in obj and not choices:
            err = obj["error"]
            msg = err.get("message", err) if isinstance(err, dict) else err
            self.error = f"error event in stream: {msg}"
        if carries:
            self.times.append(now)
            self.tokens.append(ntok)

    def finish(self, rec: Record) -> str:
        """Copy the observations into ``rec``, judge success; returns the text."""
        if self.buf.strip():  # a last event without its blank line
            self.buf, tail = b"", self.buf + b"\n\n"
            self.feed(tail, self.last_arrival)
        rec.chunk_times = self.times
        rec.chunk_tokens = self.tokens if self.per_chunk_usage else None
        rec.output_tokens = self.output_tokens
        rec.prompt_tokens = self.prompt_tokens
        rec.cached_tokens = self.cached_tokens
        if self.error is not None:
            rec.error = self.error
        elif not self.times:
            rec.error = "no output-bearing chunk in the stream"
        elif not self.finished:
            rec.error = "stream ended early (no finish_reason and no [DONE])"
        else:
            rec.ok = True
        return "".join(self.parts)


def _data_of(event: bytes) -> bytes | None:
    """The data of a multi-line SSE event (comments and ``event:`` lines ignored)."""
    lines = [ln[5:].lstrip(b" ") for ln in event.split(b"\n") if ln.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(lines)
