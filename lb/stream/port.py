"""The client-side port: how the proxy talks to the client of one completion request,
whichever HTTP server received it.

pdlb has two: its own lean HTTP/1.1 front (lb/serve/front.py), which serves the completion routes
of ordinary keep-alive clients with far less work per request, and aiohttp, which serves
everything else (other routes, HTTP/1.0, chunked or slow request bodies, ``Expect``). The
proxy talks to the client only through :class:`ClientSide`, so one request path serves both.

The answer goes out either whole (:meth:`ClientSide.send_json`) or as a stream:
:meth:`~ClientSide.start_stream` (200 + SSE headers, sent with the first piece), then
:meth:`~ClientSide.write` per piece, :meth:`~ClientSide.end` for the terminating chunk. A
client that went away makes ``write``/``end`` raise :class:`ConnectionResetError`.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from lb.accesslog import RequestRecord

SSE_HEADERS: Mapping[str, str] = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class ClientSide(ABC):
    """One request's client: its headers and body in, its answer out."""

    headers: Mapping[str, str]
    """Request headers, names in lower case (first value of a repeated header)."""
    whole_body: bytes | None = None
    """The body, when it was read with the head (else :meth:`body` waits for it)."""
    record: RequestRecord
    """The request's access-log record: each stage sets its own timings on it."""
    answer_headers: Mapping[str, str] | None = None
    """Headers every answer to this request carries, errors included (``[tenants]``'
    ``x-ratelimit-*``); None: none (no cost when tenants are off)."""

    @abstractmethod
    async def body(self) -> bytes:
        """The whole request body; a body slower than ``body_timeout_s`` raises the guard's
        408, one over ``max_body_bytes`` its 413."""

    @abstractmethod
    async def send_json(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        """A complete ``application/json`` answer."""

    @abstractmethod
    async def start_stream(self, headers: Mapping[str, str]) -> None:
        """Commit to a 200 SSE stream; the head leaves with the first :meth:`write`."""

    @abstractmethod
    async def write(self, data: bytes) -> None:
        """One piece of the stream (a chunk on the wire), waiting while the client is slow."""

    @abstractmethod
    async def end(self) -> None:
        """The stream's end (the terminating chunk)."""

    @abstractmethod
    def direct(self) -> tuple[asyncio.Transport, Any] | None:
        """After the first write of a chunked stream: the client's transport and protocol
        (with ``writing_paused``), for relaying chunks inside socket callbacks; None when
        pieces must go through :meth:`write` (no chunked framing, compression)."""

    @abstractmethod
    async def drain(self) -> None:
        """Wait until the client's transport has room again (after direct writes)."""
