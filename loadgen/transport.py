"""Transports: POST a body, hand each read of the streamed answer to a callback.

A transport is an object with one method, ``stream(body, on_data) -> (status, error_body)``,
plus ``aclose()``. ``on_data(bytes, arrived)`` receives the decoded body bytes of a 200
answer with the ``perf_counter()`` time of the read.

- :class:`FastTransport` (default for http:// and https://): a pool of keep-alive HTTP/1.1
  connections on raw asyncio protocols. The answer is parsed inside ``data_received`` by
  the parser pdlb's own backend client uses (lb/backends/h1response.py: llhttp, shipped in
  the same distribution), so a token costs one callback, not a future, a task wake-up and a
  stream-reader copy. Measured on this project's shared
  2-core VM (docs/loadgen.md, client CPU per streamed 64-token request): 370–500 µs against
  aiohttp's ~615 µs when a stream's events coalesce into few reads; 590–800 µs against
  ~610 µs when every token is its own read, i.e. no gain there.
- :class:`AiohttpTransport` (``--http-client aiohttp``): the same on one shared aiohttp
  ``ClientSession``; slower per token, but aiohttp's full HTTP stack.

Both reuse connections (never a connection per request, which would put TCP connect time
inside TTFT). Errors surface as ``OSError`` / ``TimeoutError`` / :class:`ProtocolError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Mapping
from time import perf_counter
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from lb.backends.h1response import BadResponse, ResponseParser

OnData = Callable[[bytes, float], None]
ERROR_BODY_BYTES = 300


class ProtocolError(ValueError):
    """The server's answer is not an HTTP/1.1 response (lb/backends/h1response.py)."""


class Transport(Protocol):
    """``start`` hands a request over (it may already write it); ``wait`` returns the
    answer's status and error body; ``stream`` is both."""

    def start(self, body: bytes, on_data: OnData) -> Any: ...

    async def wait(self, pending: Any) -> tuple[int, bytes]: ...

    async def stream(self, body: bytes, on_data: OnData) -> tuple[int, bytes]: ...

    async def aclose(self) -> None: ...


class AiohttpTransport:
    """POSTs on a shared aiohttp session (the caller owns and closes the session)."""

    def __init__(self, session: aiohttp.ClientSession, url: str,
                 headers: Mapping[str, str]) -> None:
        self.session = session
        self.url = url
        self.headers = dict(headers)

    def start(self, body: bytes, on_data: OnData) -> tuple[bytes, OnData]:
        return body, on_data  # aiohttp cannot write without yielding: all in wait()

    async def wait(self, pending: tuple[bytes, OnData]) -> tuple[int, bytes]:
        return await self.stream(*pending)

    async def stream(self, body: bytes, on_data: OnData) -> tuple[int, bytes]:
        async with self.session.post(self.url, data=body, headers=self.headers) as resp:
            if resp.status != 200:
                return resp.status, await resp.content.read(ERROR_BODY_BYTES)
            content = resp.content
            while True:
                data = await content.readany()
                if not data:
                    return 200, b""
                on_data(data, perf_counter())

    async def aclose(self) -> None:
        return None


# --- the fast transport ----------------------------------------------------------------------


class _Exchange:
    """One request/response on a connection, parsed as it arrives (pdlb's llhttp parser)."""

    __slots__ = ("close_after", "done", "error_body", "on_data", "parser")

    def __init__(self, on_data: OnData, done: asyncio.Future[None]) -> None:
        self.on_data = on_data
        self.done = done
        self.parser = ResponseParser()
        self.close_after = False
        self.error_body = b""

    @property
    def status(self) -> int:
        return self.parser.status

    def feed(self, data: bytes) -> None:
        now = perf_counter()
        parser = self.parser
        try:
            payload = parser.feed(data)
        except BadResponse as exc:
            raise ProtocolError(str(exc)) from None
        if payload:
            if parser.status == 200:
                self.on_data(payload, now)
            elif len(self.error_body) < ERROR_BODY_BYTES:
                self.error_body += payload[: ERROR_BODY_BYTES - len(self.error_body)]
        if parser.complete:
            self._finish()

    def _finish(self) -> None:
        parser = self.parser
        self.close_after = not parser.keep_alive or parser.extra
        if not self.done.done():
            self.done.set_result(None)

    def lost(self, exc: BaseException | None) -> None:
        if self.done.done():
            return
        if exc is None and self.parser.eof():  # a body without a length ends here
            self._finish()
            return
        err = exc or ConnectionResetError("server closed the connection mid-response")
        self.done.set_exception(err)


class _Conn(asyncio.Protocol):
    """One TCP (or TLS) connection carrying one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.closed = False
        self.used = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            self.close()  # bytes nobody asked for: this connection cannot be trusted
            return
        try:
            ex.feed(data)
        except Exception as exc:  # a parse error or the consumer's; fail this exchange
            if not ex.done.done():
                ex.done.set_exception(exc)
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex.lost(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Pending:
    """A request handed to the fast transport: written (``conn`` set) or not yet."""

    __slots__ = ("conn", "exchange", "on_data", "request", "reused")

    def __init__(self, request: bytes, on_data: OnData) -> None:
        self.request = request
        self.on_data = on_data
        self.conn: _Conn | None = None
        self.exchange: _Exchange | None = None
        self.reused = False


class FastTransport:
    """Keep-alive HTTP/1.1 POSTs of streamed answers over a pool of raw connections."""

    def __init__(self, url: str, headers: Mapping[str, str], *,
                 connect_timeout_s: float = 30.0) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"unsupported URL for the fast HTTP client: {url!r}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = (ssl.create_default_context()
                                            if u.scheme == "https" else None)
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        host_header = u.netloc.rpartition("@")[2]
        head = [f"POST {path} HTTP/1.1", f"Host: {host_header}"]
        names = {k.lower() for k in headers}
        head += [f"{k}: {v}" for k, v in headers.items() if k.lower() != "content-length"]
        if "connection" not in names:
            head.append("Connection: keep-alive")
        self._head = ("\r\n".join(head) + "\r\nContent-Length: ").encode("latin-1")
        self.connect_timeout_s = connect_timeout_s
        self._idle: list[_Conn] = []
        self._all: set[_Conn] = set()
        self._addr: tuple[int, str] | None = None

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        if self._addr is not None:
            candidates = [self._addr]
        else:  # resolve once; keep the first address that accepts (e.g. ::1 vs 127.0.0.1)
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            candidates = list(dict.fromkeys((int(i[0]), str(i[4][0])) for i in infos))
            if not candidates:
                raise OSError(f"cannot resolve {self.host}")
        error: OSError | None = None
        for family, ip in candidates:
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    _, conn = await loop.create_connection(
                        _Conn, ip, self.port, family=family, ssl=self.ssl,
                        server_hostname=self.host if self.ssl else None)
            except OSError as exc:
                error = exc
                continue
            self._addr = (family, ip)
            break
        else:
            raise error or OSError(f"cannot connect to {self.host}:{self.port}")
        self._all.add(conn)
        return conn

    def start(self, body: bytes, on_data: OnData) -> Pending:
        """Write the request now, without yielding, if a pooled connection is idle (the
        dispatcher sends at its scheduled time, not one loop iteration later); otherwise
        :meth:`wait` connects first."""
        pending = Pending(self._head + b"%d\r\n\r\n" % len(body) + body, on_data)
        conn = self._pop_idle()
        if conn is not None:
            self._write(conn, pending, reused=True)
        return pending

    async def wait(self, pending: Pending) -> tuple[int, bytes]:
        """The answer's (status, error body); the body went to ``on_data`` as it came."""
        for attempt in (0, 1):
            if pending.conn is None:
                conn = self._pop_idle()
                reused = conn is not None
                if conn is None:
                    conn = await self._connect()
                self._write(conn, pending, reused)
            conn, ex = pending.conn, pending.exchange
            if conn is None or ex is None:  # pragma: no cover - set by _write
                raise ConnectionResetError("request was not sent")
            try:
                await ex.done
            except (ConnectionError, OSError):
                conn.exchange = None
                self._all.discard(conn)
                # a kept-alive connection the server had already closed: retry once, fresh
                if pending.reused and attempt == 0 and not ex.parser.started:
                    pending.conn = None
                    continue
                raise
            except BaseException:
                conn.exchange = None
                conn.close()
                self._all.discard(conn)
                raise
            conn.exchange = None
            if ex.close_after or conn.closed:
                conn.close()
                self._all.discard(conn)
            else:
                self._idle.append(conn)
            return ex.status, ex.error_body
        raise ConnectionResetError("connection lost twice before an answer")  # pragma: no cover

    async def stream(self, body: bytes, on_data: OnData) -> tuple[int, bytes]:
        return await self.wait(self.start(body, on_data))

    def _pop_idle(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.transport is not None:
                return conn
            self._all.discard(conn)
        return None

    def _write(self, conn: _Conn, pending: Pending, reused: bool) -> None:
        ex = _Exchange(pending.on_data, asyncio.get_running_loop().create_future())
        conn.exchange = ex
        pending.conn, pending.exchange, pending.reused = conn, ex, reused
        if conn.transport is None:  # pragma: no cover - only pooled, connected ones get here
            raise ConnectionResetError("connection closed before the request was sent")
        conn.transport.write(pending.request)

    async def aclose(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._idle.clear()
        await asyncio.sleep(0)
