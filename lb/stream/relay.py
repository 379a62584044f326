"""Relaying the decode's answer to the client, with the prefill's usage stitched in.

Decode engines report usage as they see it: KV pulled from the prefill counts as "cached" on
some vLLM versions and as 0 on others, and neither is the truth the client pays for. The
truth is the prefill's. :func:`stitch_usage` builds the client's usage: prompt_tokens and
prompt_tokens_details from the prefill, completion_tokens (and its details) from the decode,
total recomputed.

Streams pass through as bytes. :class:`SSERelay` never JSON-parses an event unless it may be
the final usage event (``"choices":[]``), found by a byte search; it holds back only an
incomplete trailing event (an event split across reads), and it notices whether ``[DONE]``
arrived — the one place pdlb looks for it — so a stream that ends early can be finished with
an error event instead of being silently truncated. Every stream goes through a relay, with
or without usage to stitch: the check costs a byte search per chunk. Both ``\\n\\n`` and
``\\r\\n\\r\\n`` framings are handled.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from lb.connectors.base import PrefillResult


def _has_final_usage(data: bytes) -> bool:
    """Two literal searches (C speed); this runs on every chunk, so no generator."""
    return b'"choices":[]' in data or b'"choices": []' in data
_DONE = b"data: [DONE]"
_EVENT_END = re.compile(rb"\r?\n\r?\n")


def stitch_usage(decode_usage: Mapping[str, Any], prefill: PrefillResult) -> dict[str, Any]:
    """The client's usage: prompt side from the prefill, completion side from the decode."""
    usage = dict(decode_usage)
    prompt = prefill.prompt_tokens
    if prompt is None:
        prompt = decode_usage.get("prompt_tokens") or 0
    completion = decode_usage.get("completion_tokens") or 0
    usage["prompt_tokens"] = prompt
    usage["completion_tokens"] = completion
    usage["total_tokens"] = prompt + completion
    prefill_details = (prefill.usage or {}).get("prompt_tokens_details")
    if isinstance(prefill_details, dict):
        details = dict(prefill_details)
        if prefill.cached_tokens is not None:
            details["cached_tokens"] = prefill.cached_tokens
        usage["prompt_tokens_details"] = details
    elif prefill.cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": prefill.cached_tokens}
    elif "prompt_tokens_details" in usage:
        # The decode's figure is not the prefill's; say nothing rather than something wrong.
        usage["prompt_tokens_details"] = None
    return usage


def rewrite_response_usage(body: dict[str, Any], prefill: PrefillResult) -> bool:
    """Stitch usage into a non-streamed response body in place; False when it has none."""
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return False
    body["usage"] = stitch_usage(usage, prefill)
    return True


class SSERelay:
    """Feeds decode bytes through, rewriting only the final usage event."""

    __slots__ = ("_pending", "prefill", "rewrites", "saw_done", "usage")

    def __init__(self, prefill: PrefillResult | None) -> None:
        self.prefill = prefill
        """Whose usage to stitch in; None: none (a decode-only request), pass through."""
        self._pending = b""
        self.saw_done = False
        """``data: [DONE]`` went by: pdlb's only place that knows whether a stream ended."""
        self.rewrites = 0
        self.usage: Mapping[str, Any] | None = None
        """The stitched final usage (for the access log), once rewritten."""

    def feed(self, data: bytes) -> bytes:
        """Return the bytes that can go to the client now (possibly empty)."""
        if self._pending:
            data = self._pending + data
            self._pending = b""
        if not (data.endswith(b"\n\n") or data.endswith(b"\r\n\r\n")):
            cut = _last_event_end(data)
            if cut < 0:
                self._pending = data
                return b""
            self._pending = data[cut:]
            data = data[:cut]
        if _DONE in data:
            self.saw_done = True
        if self.prefill is not None and _has_final_usage(data):
            data = self._rewrite_events(data)
        return data

    def may_hold_final_usage(self, data: bytes) -> bool:
        """Whether ``data`` (with any held-back partial event) may complete the final usage
        event — a concurrent connector's proxy then fetches the prefill's usage first."""
        joined = self._pending + data if self._pending else data
        return _has_final_usage(joined)

    def flush(self) -> bytes:
        """At end of stream: whatever incomplete event remained (passed through as is)."""
        rest, self._pending = self._pending, b""
        if _DONE in rest:
            self.saw_done = True
        return rest

    def _rewrite_events(self, data: bytes) -> bytes:
        out: list[bytes] = []
        pos = 0
        for match in _EVENT_END.finditer(data):
            event = data[pos:match.start()]
            sep = match.group(0)
            pos = match.end()
            out.append(self._rewrite_event(event) + sep)
        out.append(data[pos:])
        return b"".join(out)

    def _rewrite_event(self, event: bytes) -> bytes:
        if self.prefill is None or not _has_final_usage(event):
            return event
        # An SSE event may hold several lines; only a single "data:" line is ours to touch.
        if not event.startswith(b"data:") or b"\n" in event.rstrip(b"\r"):
            return event
        try:
            payload = orjson.loads(event[5:])
        except orjson.JSONDecodeError:
            return event
        if not isinstance(payload, dict) or payload.get("choices") != []:
            return event
        if not rewrite_response_usage(payload, self.prefill):
            return event
        self.rewrites += 1
        self.usage = payload["usage"]
        return b"data: " + orjson.dumps(payload)


def _last_event_end(data: bytes) -> int:
    """Index just past the last complete event's blank line, or -1."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    if lf < 0 and crlf < 0:
        return -1
    return max(lf + 2 if lf >= 0 else -1, crlf + 4 if crlf >= 0 else -1)


def sse_event(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"
