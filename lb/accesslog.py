"""The access log: one line per finished completion request (logger ``pdlb.access``, INFO).

The request path only fills a :class:`RequestRecord` — plain floats, strings and ints set on
one small object with ``__slots__`` as the stages happen (the proxy, its legs and the answer
relay each set their own fields). The line is formatted once, by the guard after it counted
the request, and only when ``[log] access`` is on and ``pdlb.access`` logs at INFO: a server
with the access log off pays for the record and nothing else. Nothing here parses the
answer: output tokens are known when the relay already read the usage (a JSON answer, or a
stream's final usage event that it stitched).

Never in a line: the prompt, an API key, a token value, a header.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson

ACCESS_LOGGER = "pdlb.access"

CLIENT_DISCONNECT = "client_disconnect"
"""The reason of a request whose client left before its answer ended (logged as 499)."""


class RequestRecord:
    """What one completion request did, as far as its access line says (seconds, or None
    when a stage did not happen)."""

    __slots__ = (
        "cached_tokens", "decode_backend", "decode_s", "delivered", "handoff_s", "model",
        "prefill_backend",
        "prefill_s", "prompt_tokens", "queue_s", "reason", "request_id", "started",
        "tenant", "tokenize_s", "ttft_s", "usage",
    )

    def __init__(self, started: float) -> None:
        self.started = started
        """time.monotonic() when the guard took the request."""
        self.request_id: str | None = None
        self.model: str | None = None
        self.tenant: str | None = None
        """Its tenant (``[tenants]``; None when tenancy is off)."""
        self.prompt_tokens: int | None = None
        """pdlb's count (or estimate) until a backend's usage says otherwise."""
        self.cached_tokens: int | None = None
        self.usage: Mapping[str, Any] | None = None
        """The answer's usage object, when the relay read it anyway."""
        self.prefill_backend: str | None = None
        self.decode_backend: str | None = None
        self.queue_s: float | None = None
        self.tokenize_s: float | None = None
        self.prefill_s: float | None = None
        self.handoff_s: float | None = None
        self.decode_s: float | None = None
        self.ttft_s: float | None = None
        self.delivered = False
        """A stream's ``[DONE]`` was written to the client: the answer is whole even if the
        client leaves before pdlb's terminating chunk."""
        self.reason: str | None = None
        """Why the request was refused or failed: the error's code (an admission
        rejection's reason), a stream error's code, or :data:`CLIENT_DISCONNECT`."""


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class AccessLog:
    """Formats and writes access lines (``fmt``: ``text`` or ``json``)."""

    __slots__ = ("_json", "_log", "_second", "_second_text", "enabled")

    def __init__(self, enabled: bool, fmt: str) -> None:
        self.enabled = enabled
        self._json = fmt == "json"
        self._log = logging.getLogger(ACCESS_LOGGER)
        self._second = 0
        self._second_text = ""

    def _utc_now(self) -> str:
        """ISO 8601 UTC with milliseconds; the seconds part formatted once a second."""
        now = time.time()
        whole = int(now)
        if whole != self._second:
            self._second = whole
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        return f"{self._second_text}.{int((now - whole) * 1000):03d}Z"

    def emit(self, record: RequestRecord, *, client: str, endpoint: str, status: int) -> None:
        """Write ``record``'s line, if access logging is on at INFO."""
        if not (self.enabled and self._log.isEnabledFor(logging.INFO)):
            return
        fields = self.fields(record, client=client, endpoint=endpoint, status=status)
        if self._json:
            self._log.info("%s", orjson.dumps({"time": self._utc_now(), **fields}).decode())
        else:  # the log line's own time is the logging format's
            self._log.info("%s", " ".join(
                [f"{key}={'-' if value is None else value}" for key, value in fields.items()]))

    @staticmethod
    def fields(record: RequestRecord, *, client: str, endpoint: str, status: int
               ) -> dict[str, Any]:
        """The line's fields, in order (times in milliseconds)."""
        now = time.monotonic()
        usage = record.usage
        prompt = cached = output = None
        if usage is not None:
            prompt = _int(usage.get("prompt_tokens"))
            output = _int(usage.get("completion_tokens"))
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                cached = _int(details.get("cached_tokens"))
        return {
            "request_id": record.request_id,
            "client": client,
            "endpoint": endpoint,
            "model": record.model,
            "tenant": record.tenant,
            "status": status,
            "prompt_tokens": prompt if prompt is not None else record.prompt_tokens,
            "cached_tokens": cached if cached is not None else record.cached_tokens,
            "output_tokens": output,
            "prefill": record.prefill_backend,
            "decode": record.decode_backend,
            "queue_ms": _ms(record.queue_s),
            "tokenize_ms": _ms(record.tokenize_s),
            "prefill_ms": _ms(record.prefill_s),
            "handoff_ms": _ms(record.handoff_s),
            "decode_ms": _ms(record.decode_s),
            "ttft_ms": _ms(record.ttft_s),
            "total_ms": _ms(now - record.started),
            "reason": record.reason,
        }


class JsonFormatter(logging.Formatter):
    """``[log] format = "json"``: every log line one JSON object. An access line's message
    is already one (its fields at the top level); any other gets time, level, logger and
    message (and the traceback, for a bug)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name == ACCESS_LOGGER and message.startswith("{"):
            return message
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()
