"""pdlb's own HTTP/1.1 client: POST to a backend, then its response's body piece by piece,
delivered inside ``data_received``.

Reading a streamed answer through aiohttp's client costs, per chunk, a future, a task
wake-up and a StreamReader copy. Here each read from the backend is parsed where it arrives
(lb/backends/h1response.py: llhttp) and its body bytes go straight to the consumer's
callback — for the decode stream, the relay pipe of lb/stream/pipe.py, which writes them to
the client in the same callback. :class:`FastResponse` is that body source: ``start`` (the
callbacks), ``pause``/``resume`` (backpressure), ``close`` (abandon), ``read`` (the whole
body, for JSON answers and errors).

Connections are kept alive per backend (``host:port``). A connection goes back to the pool
only once its response was read to the end with nothing after it; any other exit closes it,
which is what makes vLLM abort the request and free its KV.

Errors are lb.errors (this module does not import aiohttp), the same codes as
:func:`lb.backends.translate.translate` gives aiohttp's: connect refused →
``backend_connect_error``; lost after the request was sent, or a body cut short →
``backend_connection_lost``; no head in time → ``backend_timeout``; bytes that are not an
HTTP/1.1 response (a bad status line, a bad length or chunk size, a head or trailers over
64 KiB, ``101``) → ``invalid_backend_response``; a 4xx/5xx → :class:`BackendHTTPError` with
the backend's body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import cast
from urllib.parse import urlsplit

import orjson

from lb.backends.h1response import BadResponse, ResponseParser
from lb.errors import BackendConnectError, BackendHTTPError, BackendTimeout, UpstreamError


class _Lost(Exception):
    """The connection ended before the response head was complete."""


def http_error(status: int, body: bytes, content_type: str, what: str) -> BackendHTTPError:
    """The error for a backend's 4xx/5xx answer (the message names its error.message)."""
    message = f"{what}: backend answered {status}"
    try:
        detail = orjson.loads(body)["error"]["message"]
        message += f": {detail}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    return BackendHTTPError(message, status=status, raw_body=body, content_type=content_type)


def invalid_response(what: str, exc: BadResponse) -> UpstreamError:
    """A 502 for bytes that are not an HTTP/1.1 response."""
    return UpstreamError(f"{what}: invalid HTTP response from the backend ({exc})",
                         code="invalid_backend_response")


def body_cut(what: str) -> BackendConnectError:
    """The error that ends a body the connection lost (or pdlb cut) before its end."""
    return BackendConnectError(f"{what}: connection lost before the end of the body",
                               code="backend_connection_lost")


class FastResponse:
    """One response being read: its head, then body pieces delivered to callbacks."""

    __slots__ = (
        "_conn",
        "_data_cb",
        "_end_cb",
        "_ended",
        "_error",
        "_held",
        "content_type",
        "headers",
        "keep_alive",
        "status",
    )

    def __init__(self, conn: _Conn, status: int, headers: dict[str, str],
                 keep_alive: bool) -> None:
        self._conn: _Conn | None = conn
        self.status = status
        self.headers = headers
        self.keep_alive = keep_alive
        ctype = headers.get("content-type", "application/octet-stream")
        self.content_type = ctype.split(";", 1)[0].strip().lower()
        self._data_cb: Callable[[bytes], None] | None = None
        self._end_cb: Callable[[BaseException | None], None] | None = None
        self._held: list[bytes] = []  # body received before a consumer was attached
        self._ended = False
        self._error: BaseException | None = None

    # -- the connection's side
    def _data(self, data: bytes) -> None:
        cb = self._data_cb
        if cb is None:
            self._held.append(data)
        else:
            cb(data)

    def _end(self, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._error = error
        if error is not None:
            self._conn = None  # the connection is gone or closing
        if self._end_cb is not None:
            self._end_cb(error)

    # -- the consumer's side
    def start(self, on_data: Callable[[bytes], None],
              on_end: Callable[[BaseException | None], None]) -> None:
        """Deliver the body: each piece to ``on_data`` (one per read from the backend), then
        ``on_end(None | error)`` with an lb.errors error: ``backend_connection_lost`` for a
        body cut short, ``invalid_backend_response`` for one that is not HTTP/1.1."""
        self._data_cb = on_data
        self._end_cb = on_end
        held, self._held = self._held, []
        for data in held:
            if self._end_cb is None:
                return  # closed from inside on_data: nothing more for this consumer
            on_data(data)
        if self._ended and self._end_cb is not None:
            on_end(self._error)

    async def read(self) -> bytes:
        """The whole body (JSON answers, error answers)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        parts: list[bytes] = []

        def end(error: BaseException | None) -> None:
            if not done.done():
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

        self.start(parts.append, end)
        await done
        return b"".join(parts)

    def pause(self) -> None:
        if self._conn is not None:
            self._conn.pause()

    def resume(self) -> None:
        if self._conn is not None:
            self._conn.resume()

    def close(self) -> None:
        """Abandon the response: the connection is closed unless it was already released."""
        conn, self._conn = self._conn, None
        self._ended = True  # the consumer left: no end callback, no held piece
        self._end_cb = self._data_cb = None
        self._held = []
        if conn is not None and conn.response is self:
            conn.abort()


class _Conn(asyncio.Protocol):
    """One keep-alive connection to a backend, reading the response of its current request."""

    def __init__(self, pool: list[_Conn], loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.response: FastResponse | None = None
        self._head_waiter: asyncio.Future[FastResponse] | None = None
        self._parser: ResponseParser | None = None  # set while a request is outstanding
        self._what = "backend"
        self._paused = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but behave as one)
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._drop_from_pool()
        parser, self._parser = self._parser, None
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(_Lost())
        response, self.response = self.response, None
        if response is not None:
            whole = exc is None and parser is not None and parser.eof()
            response._end(None if whole else body_cut(self._what))

    def eof_received(self) -> bool:
        return False  # close; connection_lost reports what was cut

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:  # bytes on an idle connection: unusable
            self.abort()
            return
        try:
            body = parser.feed(data)
        except BadResponse as exc:
            if exc.body and self.response is not None:
                self.response._data(exc.body)  # what came before the fault
            self._fail(invalid_response(self._what, exc))
            return
        response = self.response
        if response is None:
            if not parser.status:
                return  # the head is not complete yet
            response = self._start(parser)
        if body:
            response._data(body)  # (the consumer may pause or close from here)
        if parser.complete and self.response is response:
            self._parser = None
            self.response = None
            reusable = response.keep_alive and not parser.extra and not self.closed
            response._conn = None
            response._end(None)
            if reusable:
                self._release()
            else:
                self.abort()

    # -- requests
    def send(self, head: bytes, body: bytes, what: str = "backend") -> asyncio.Future[FastResponse]:
        """Write a request; the future gets the response once its head is in."""
        assert self.transport is not None
        waiter: asyncio.Future[FastResponse] = self._loop.create_future()
        self._head_waiter = waiter
        self._parser = ResponseParser()
        self._what = what
        self.transport.write(head + body)
        return waiter

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def abort(self, error: BaseException | None = None) -> None:
        """Close now; a response still being read ends with ``error`` (by default: cut)."""
        self.closed = True
        parser, self._parser = self._parser, None
        if parser is not None:
            parser.close()
        self._drop_from_pool()
        response, self.response = self.response, None
        if response is not None:  # cut by us: never a complete body, whatever the framing
            response._end(error or body_cut(self._what))
        if self.transport is not None:
            self.transport.abort()

    def _start(self, parser: ResponseParser) -> FastResponse:
        """The head is in: the response exists and whoever waits for it gets it."""
        response = FastResponse(self, parser.status, parser.headers, parser.keep_alive)
        self.response = response
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        return response

    def _fail(self, error: UpstreamError) -> None:
        """The backend's bytes are not a response: whoever waits gets ``error``; closed."""
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.abort(error)

    def _release(self) -> None:
        if self._paused:
            self.resume()
        self.idle_since = self._loop.time()
        self._pool.append(self)

    def _drop_from_pool(self) -> None:
        if self in self._pool:
            self._pool.remove(self)


class FastClient:
    """Keep-alive pools per backend and the one call the decode leg needs."""

    def __init__(self, connect_s: float, keepalive_s: float = 15.0) -> None:
        self.connect_s = connect_s
        self.keepalive_s = keepalive_s
        self._pools: dict[tuple[str, int], list[_Conn]] = {}
        self._targets: dict[str, tuple[str, int, str, str] | None] = {}

    def target(self, url: str) -> tuple[str, int, str, str] | None:
        """(host, port, Host header, request target) for a plain-http URL, else None."""
        try:
            return self._targets[url]
        except KeyError:
            pass
        parts = urlsplit(url)
        result: tuple[str, int, str, str] | None = None
        if parts.scheme == "http" and parts.hostname and not parts.username:
            port = parts.port or 80
            host_header = parts.netloc
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            result = (parts.hostname, port, host_header, path)
        if len(self._targets) < 4096:
            self._targets[url] = result
        return result

    def supports(self, url: str) -> bool:
        return self.target(url) is not None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str], *,
                   timeout_s: float, what: str) -> FastResponse:
        """POST and return the response once its head arrived (status < 400), within
        ``timeout_s``. A 4xx/5xx raises BackendHTTPError after reading its body."""
        response, _ = await self._exchange(url, body, headers, timeout_s, what, False)
        return response

    async def post_read(self, url: str, body: bytes, headers: Mapping[str, str], *,
                        timeout_s: float, what: str) -> bytes:
        """POST and return the whole body of a status < 400 answer, within ``timeout_s``."""
        _, raw = await self._exchange(url, body, headers, timeout_s, what, True)
        return raw

    async def _exchange(self, url: str, body: bytes, headers: Mapping[str, str],
                        timeout_s: float, what: str, read: bool) -> tuple[FastResponse, bytes]:
        target = self.target(url)
        if target is None:
            raise UpstreamError(f"{what}: not a plain http URL", code="backend_error")
        host, port, host_header, path = target
        lines = [f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\n"]
        for name, value in headers.items():
            if "\n" in value or "\r" in value or name.lower() in ("content-length", "host"):
                continue
            lines.append(f"{name}: {value}\r\n")
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        # Values read from a client request may carry its non-UTF-8 bytes as surrogates.
        head = "".join(lines).encode("utf-8", "surrogateescape")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                conn = await self._acquire(loop, host, port, what)
                try:
                    response = await conn.send(head, body, what)
                except BaseException:
                    conn.abort()
                    raise
                if response.status >= 400:
                    try:
                        raw = await response.read()
                    except BaseException:
                        response.close()
                        raise
                    raise http_error(response.status, raw, response.content_type, what)
                raw = b""
                if read:
                    try:
                        raw = await response.read()
                    except BaseException:
                        response.close()
                        raise
        except TimeoutError as exc:
            raise BackendTimeout(f"{what}: timed out", code="backend_timeout") from exc
        except (_Lost, ConnectionError) as exc:
            raise BackendConnectError(
                f"{what}: connection lost before the answer's head",
                code="backend_connection_lost") from exc
        return response, raw

    async def _acquire(self, loop: asyncio.AbstractEventLoop, host: str, port: int,
                       what: str) -> _Conn:
        key = (host, port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = []
        now = loop.time()
        while pool:
            conn = pool.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                continue
            if now - conn.idle_since > self.keepalive_s:
                conn.abort()
                continue
            return conn
        try:
            async with asyncio.timeout(self.connect_s):
                _, protocol = await loop.create_connection(lambda: _Conn(pool, loop), host, port)
        except TimeoutError:
            raise
        except OSError as exc:
            raise BackendConnectError(
                f"{what}: cannot connect ({exc.strerror or exc})", code="backend_connect_error"
            ) from exc
        return protocol

    def close(self) -> None:
        for pool in self._pools.values():
            for conn in list(pool):
                conn.abort()
            pool.clear()
        self._pools.clear()
