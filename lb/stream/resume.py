"""The relays of a stream that may migrate (lb/migration.py, docs/migration.md).

:class:`RecordingRelay` is the first leg's: an :class:`~lb.stream.relay.SSERelay` that also
keeps each piece it lets through — the bytes themselves, already built, appended to a list;
nothing is parsed unless the stream breaks.

:class:`ResumeRelay` is a continuation's: its chunks go into a stream the client already
reads, so each event is parsed and rewritten — the first leg's ``id``, ``created``, ``model``
and choice index; no second role chunk (chat) and no second ``prompt_token_ids``; every usage
counting the original prompt and all generated tokens once. Only a migrated request pays
for that parsing, and only on its continuation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from lb.connectors.base import PrefillResult
from lb.migration import Transcript
from lb.stream.relay import SSERelay, stitch_usage

_EVENT_END = re.compile(rb"\r?\n\r?\n")
_ERROR = b'"error"'
_ERROR_EVENT = b'data: {"error"'


class RecordingRelay(SSERelay):
    """An SSERelay that keeps what it passed to the client, for a continuation.

    A decode that reports an error in-band (vLLM's ``data: {"error": ...}`` then ``[DONE]``,
    its way of failing after the 200) is a broken stream too: the error event and what
    follows are held back, so the body ends without ``[DONE]`` and the stream migrates. The
    check is a ``startswith`` per piece, and a byte search once ``[DONE]`` came."""

    __slots__ = ("cut", "transcript")

    def __init__(self, prefill: PrefillResult | None, transcript: Transcript) -> None:
        super().__init__(prefill)
        self.transcript = transcript
        self.cut = False

    def feed(self, data: bytes) -> bytes:
        if self.cut:
            return b""
        out = SSERelay.feed(self, data)
        # vLLM writes the error event and [DONE] apart: one starts a piece, or [DONE] came.
        if out.startswith(_ERROR_EVENT) or (self.saw_done and _ERROR in out):
            out = self._cut(out)
        self.transcript.pieces.append(out)
        return out

    def flush(self) -> bytes:
        if self.cut:
            return b""
        rest = SSERelay.flush(self)
        if _ERROR in rest:
            rest = self._cut(rest)
        if rest:
            self.transcript.pieces.append(rest)
        return rest

    def _cut(self, data: bytes) -> bytes:
        """The events before the first error event; the rest is dropped."""
        pos = 0
        for match in _EVENT_END.finditer(data + b"\n\n"):
            event = data[pos:match.start()]
            if _is_error(event):
                self.cut = True
                self.saw_done = False
                self.transcript.backend_error = _error_message(event)
                return data[:pos]
            pos = match.end()
        return data


class ResumeRelay(SSERelay):
    """A continuation's events, rewritten to continue the client's stream."""

    __slots__ = ("carried", "cut", "transcript")

    def __init__(self, transcript: Transcript) -> None:
        super().__init__(None)
        self.transcript = transcript
        self.cut = False
        self.carried = transcript.generated
        """Tokens generated before this leg: its prompt holds them, its usage does not."""

    def may_hold_final_usage(self, data: bytes) -> bool:
        return False  # the usage is the first leg's prefill's and this relay's: no fetch

    def feed(self, data: bytes) -> bytes:
        return self._rewrite(SSERelay.feed(self, data)) if not self.cut else b""

    def flush(self) -> bytes:
        if self.cut:
            return b""
        rest = SSERelay.flush(self)  # an event the body ended without its blank line
        return self._rewrite(rest + b"\n\n") if rest.strip() else rest

    def _rewrite(self, data: bytes) -> bytes:
        if not data:
            return data
        out: list[bytes] = []
        pos = 0
        for match in _EVENT_END.finditer(data):
            event = self._event(data[pos:match.start()])
            if self.cut:
                self.saw_done = False
                break
            if event is not None:
                out.append(event + match.group(0))
            pos = match.end()
        else:
            if pos < len(data):
                out.append(data[pos:])
        return b"".join(out)

    def _event(self, event: bytes) -> bytes | None:
        """One rewritten event; None to drop it (a second role chunk)."""
        if not event.startswith(b"data:"):
            return event
        try:
            chunk = orjson.loads(event[5:])
        except orjson.JSONDecodeError:
            return event  # [DONE], or something we do not understand: as is
        if not isinstance(chunk, dict):
            return event
        t = self.transcript
        if "error" in chunk:  # as on the first leg: a broken stream, maybe continued again
            self.cut = True
            t.backend_error = _error_message(event)
            return None
        if t.id is not None:
            chunk["id"] = t.id
            chunk["created"] = t.created
            chunk["model"] = t.model
        if t.prompt_token_ids is not None:  # the client had the original prompt's already
            chunk.pop("prompt_token_ids", None)
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices:
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                choice["index"] = t.index
                if "prompt_token_ids" in choice and t.prompt_token_ids is not None:
                    choice["prompt_token_ids"] = None
                delta = choice.get("delta")
                if isinstance(delta, dict) and t.role_sent:
                    delta.pop("role", None)
            if t.chat and t.role_sent and "usage" not in chunk \
                    and all(_empty(c) for c in choices):
                return None  # the continuation's role chunk: the client had one
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            chunk["usage"] = self._usage(usage)
            if choices == []:
                self.rewrites += 1
                self.usage = chunk["usage"]
        t.absorb(chunk)
        return b"data: " + orjson.dumps(chunk)

    def _usage(self, usage: Mapping[str, Any]) -> dict[str, Any]:
        """The continuation's usage as the client's: the original prompt, every generated
        token once, the first prefill's cached tokens (docs/migration.md)."""
        t = self.transcript
        completion = (usage.get("completion_tokens") or 0) + self.carried
        if t.prefill is not None and t.prefill.prompt_tokens is not None:
            prompt = t.prefill.prompt_tokens
        elif isinstance(usage.get("prompt_tokens"), int):
            # No prefill counted it (a decode-only first leg): the continuation's prompt is
            # the original one plus the carried tokens.
            prompt = max(0, usage["prompt_tokens"] - self.carried)
        else:
            prompt = t.prompt_tokens or 0
        first = dict(usage)
        first["completion_tokens"] = completion
        if t.prefill is not None:
            first = stitch_usage(first, t.prefill)
        else:
            # The continuation's cached figure is its own re-prefill's, not the client's.
            if "prompt_tokens_details" in first:
                first["prompt_tokens_details"] = None
        first["prompt_tokens"] = prompt
        first["total_tokens"] = prompt + completion
        return first


def _empty(choice: Any) -> bool:
    """A chat choice that says nothing: no text, tool call, token, logprobs or finish."""
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta") or {}
    return (not delta.get("content") and not delta.get("tool_calls")
            and not delta.get("reasoning_content") and not delta.get("reasoning")
            and not choice.get("finish_reason") and not choice.get("logprobs")
            and not choice.get("token_ids"))


def _is_error(event: bytes) -> bool:
    """Whether one SSE event is an error object (parsed only when the bytes say maybe)."""
    if _ERROR not in event or not event.startswith(b"data:"):
        return False
    try:
        chunk = orjson.loads(event[5:])
    except orjson.JSONDecodeError:
        return False
    return isinstance(chunk, dict) and "error" in chunk


def _error_message(event: bytes) -> str:
    try:
        error = orjson.loads(event[5:]).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return "an error event"
    message = error.get("message") if isinstance(error, dict) else error
    return str(message)[:300]
