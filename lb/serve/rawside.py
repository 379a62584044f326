"""The client's side of a request that pdlb's front serves: answers written straight to its
transport, hand-framed (status line, a few headers, chunked SSE), no aiohttp objects."""

from __future__ import annotations

import asyncio
import http
import time
from collections.abc import Mapping
from email.utils import formatdate
from typing import Any, Protocol

from lb.serve.guard import ErrorAnswer, ServedClient
from lb.stream.port import SSE_HEADERS


class Connection(Protocol):
    """What a :class:`RawSide` needs of its connection (lb/serve/front.py's FrontProtocol)."""

    transport: asyncio.Transport | None
    peername: Any
    writing_paused: bool
    close_after: bool

    async def drain(self) -> None: ...


def peer_address(peername: Any) -> str:
    """``host`` of a socket address (``-`` when unknown, e.g. a Unix socket's)."""
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return "-"


def _header_value(value: str) -> bytes:
    """The bytes the client sent, for a value read from a request (``surrogateescape``)."""
    return value.encode("utf-8", "surrogateescape")


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


class _Date:
    """The Date header's value, formatted once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True).encode()
        return self._value


_date = _Date()


class RawSide(ServedClient):
    """The client of a request the front serves: answers go straight to its transport."""

    __slots__ = ("_conn", "_stream_head", "headers", "record", "started", "status",
                 "whole_body")

    status: int

    def __init__(self, conn: Connection, headers: dict[str, str], body: bytes) -> None:
        self._conn = conn
        self.headers = headers
        self.whole_body: bytes | None = body
        self._stream_head = b""
        self.started = False
        self.status = 0

    async def body(self) -> bytes:
        return self.whole_body or b""

    def peer(self) -> str:
        return peer_address(self._conn.peername)

    async def send_json(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_now(status, body, headers)

    def send_error(self, answer: ErrorAnswer) -> None:
        if self.started:  # the head is out: nothing honest left to say on this connection
            self._conn.close_after = True
            return
        self.send_now(answer.status, answer.body, answer.headers, close=answer.close)

    def send_now(self, status: int, body: bytes, headers: Mapping[str, str],
                 close: bool = False) -> None:
        conn = self._conn
        self.status = status
        self.started = True
        if close:
            conn.close_after = True
        head = self._head(b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n" % (status, _reason(status), len(body)),
                          headers)
        transport = conn.transport
        if transport is not None and not transport.is_closing():
            transport.write(head + body)

    async def start_stream(self, headers: Mapping[str, str]) -> None:
        self.status = 200
        self.started = True
        self._stream_head = self._head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n",
                                       {**SSE_HEADERS, **headers})
        # The head leaves with the first piece when that is ready in this same loop turn
        # (one send instead of two), else on its own right after: a client sees the 200
        # as soon as the decode accepted the request, as with aiohttp.
        asyncio.get_running_loop().call_soon(self._flush_head)

    def _head(self, first_lines: bytes, headers: Mapping[str, str]) -> bytes:
        """The answer's head: ``first_lines`` (status line and framing), ``headers``, Date,
        and ``Connection: close`` when the connection ends after this answer."""
        lines = [first_lines]
        for name, value in headers.items():
            lines.append(b"%b: %b\r\n" % (name.encode("latin-1"), _header_value(value)))
        lines.append(b"Date: %b\r\n%b\r\n" % (
            _date(), b"Connection: close\r\n" if self._conn.close_after else b""))
        return b"".join(lines)

    def _flush_head(self) -> None:
        head, self._stream_head = self._stream_head, b""
        transport = self._conn.transport
        if head and transport is not None and not transport.is_closing():
            transport.write(head)

    async def write(self, data: bytes) -> None:
        if not data:
            return  # an empty chunk would end the stream
        transport = self._conn.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        head, self._stream_head = self._stream_head, b""
        transport.write(b"%b%x\r\n%b\r\n" % (head, len(data), data))
        if self._conn.writing_paused:
            await self._conn.drain()

    async def end(self) -> None:
        transport = self._conn.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        head, self._stream_head = self._stream_head, b""
        transport.write(head + b"0\r\n\r\n")

    def direct(self) -> tuple[asyncio.Transport, Any] | None:
        if self._stream_head or self._conn.transport is None:
            return None  # nothing written yet: the head must go first
        return self._conn.transport, self._conn

    async def drain(self) -> None:
        await self._conn.drain()
