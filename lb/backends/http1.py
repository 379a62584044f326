"""A minimal HTTP/1.1 client for the decode stream, and a zero-await relay to the client.

Relaying a streamed answer through aiohttp's client costs, per chunk, a future, a task
wake-up, a StreamReader copy and a chunked ``writelines`` on the way out. Here the decode's
response is parsed in ``data_received`` (status line, headers, chunked or Content-Length
framing) and each decoded body piece is handed to :class:`Pipe`, which runs it through the
SSE relay and writes it to the client's transport with its chunked framing in one
``transport.write`` — the handler coroutine only wakes for the first piece (written through
aiohttp so that it sends the buffered response headers), for backpressure, for a concurrent
connector's usage fetch, and at the end.

Connections are kept alive per backend (``host:port``) like aiohttp's pool. A connection is
returned to the pool only once its response was read to the end and nothing else arrived;
any other exit closes it, which is what makes vLLM abort the request and free its KV.

Errors map to lb.errors exactly like :func:`lb.backends.upstream.translate_errors` maps aiohttp's:
connect refused → ``backend_connect_error``; lost after the request was sent →
``backend_connection_lost``; no head in time → ``backend_timeout``; a 4xx/5xx →
:class:`BackendHTTPError` with the backend's body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import cast
from urllib.parse import urlsplit

import aiohttp
import orjson

from lb.errors import BackendConnectError, BackendHTTPError, BackendTimeout, UpstreamError

_MAX_HEAD = 64 * 1024
_MAX_CHUNK_LINE = 4096

# Body framings
_LENGTH, _CHUNKED, _UNTIL_CLOSE = 0, 1, 2


class _Lost(Exception):
    """The connection ended before the response head was complete."""


class _BadResponse(Exception):
    """The backend's bytes are not HTTP/1.1 as this client understands it."""


def http_error(status: int, body: bytes, content_type: str, what: str) -> BackendHTTPError:
    """The error for a backend's 4xx/5xx answer (the message names its error.message)."""
    message = f"{what}: backend answered {status}"
    try:
        detail = orjson.loads(body)["error"]["message"]
        message += f": {detail}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    return BackendHTTPError(message, status=status, raw_body=body, content_type=content_type)


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
        """Deliver the body: each piece to ``on_data``; then ``on_end(None | error)``."""
        self._data_cb = on_data
        self._end_cb = on_end
        held, self._held = self._held, []
        for data in held:
            on_data(data)
        if self._ended:
            on_end(self._error)

    async def read(self) -> bytes:
        """The whole body (for error answers)."""
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
        self._ended = True  # the consumer left: no end callback
        if conn is not None and conn.response is self:
            conn.abort()


class _Conn(asyncio.Protocol):
    """One keep-alive connection to a backend; parses the response of its current request."""

    def __init__(self, pool: list[_Conn], loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.response: FastResponse | None = None
        self._head_waiter: asyncio.Future[FastResponse] | None = None
        self._buf = b""
        self._framing = _LENGTH
        self._left = 0  # Content-Length left, or bytes left in the current chunk
        self._need_crlf = False
        self._trailers = False
        self._paused = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but behave as one)
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._drop_from_pool()
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(_Lost())
        response, self.response = self.response, None
        if response is not None:
            if self._framing == _UNTIL_CLOSE and self._buf == b"" and exc is None:
                response._end(None)
            else:
                response._end(aiohttp.ClientPayloadError("Response payload is not completed"))

    def eof_received(self) -> bool:
        return False  # close; connection_lost reports what was cut

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            if self._head_waiter is None:  # bytes on an idle connection: unusable
                self.abort()
                return
            try:
                if not self._head(data):
                    return
            except _BadResponse as exc:
                waiter, self._head_waiter = self._head_waiter, None
                if waiter is not None and not waiter.done():
                    waiter.set_exception(exc)
                self.abort()
                return
            response = self.response
            assert response is not None
            data, self._buf = self._buf, b""
            if not data and not self._complete():
                return
        try:
            piece, complete = self._body(data)
        except _BadResponse:
            self.abort()
            return
        if piece:
            response._data(piece)
        if complete and self.response is response:
            self.response = None
            reusable = response.keep_alive and not self._buf and not self.closed
            response._conn = None
            response._end(None)
            if reusable:
                self._release()
            else:
                self.abort()

    # -- requests
    def send(self, head: bytes, body: bytes) -> asyncio.Future[FastResponse]:
        assert self.transport is not None
        waiter: asyncio.Future[FastResponse] = self._loop.create_future()
        self._head_waiter = waiter
        self._buf = b""
        self._need_crlf = self._trailers = False
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

    def abort(self) -> None:
        self.closed = True
        self._drop_from_pool()
        response, self.response = self.response, None
        if response is not None:  # cut by us: never a complete body, whatever the framing
            response._end(aiohttp.ClientPayloadError("Response payload is not completed"))
        if self.transport is not None:
            self.transport.abort()

    def _release(self) -> None:
        if self._paused:
            self.resume()
        self.idle_since = self._loop.time()
        self._pool.append(self)

    def _drop_from_pool(self) -> None:
        if self in self._pool:
            self._pool.remove(self)

    # -- parsing
    def _head(self, data: bytes) -> bool:
        buf = self._buf + data if self._buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise _BadResponse("response head too large")
                self._buf = buf
                return False
            head = buf[:end].decode("latin-1")
            buf = buf[end + 4:]
            lines = head.split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise _BadResponse(f"bad status line {lines[0][:80]!r}")
            status = int(parts[1])
            if 100 <= status < 200:
                continue  # an interim answer; the real one follows
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    raise _BadResponse("bad header line")
                name = name.strip().lower()
                value = value.strip()
                if name in headers:
                    headers[name] += ", " + value
                else:
                    headers[name] = value
            break
        connection = headers.get("connection", "").lower()
        keep_alive = ("close" not in connection if parts[0] == "HTTP/1.1"
                      else "keep-alive" in connection)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._framing = _CHUNKED
            self._left = 0
        elif "content-length" in headers:
            try:
                self._left = int(headers["content-length"])
            except ValueError:
                raise _BadResponse("bad Content-Length") from None
            if self._left < 0:
                raise _BadResponse("bad Content-Length")
            self._framing = _LENGTH
        elif status in (204, 304):
            self._framing = _LENGTH
            self._left = 0
        else:
            self._framing = _UNTIL_CLOSE
            keep_alive = False
        self._buf = buf
        response = FastResponse(self, status, headers, keep_alive)
        self.response = response
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        return True

    def _complete(self) -> bool:
        return self._framing == _LENGTH and self._left == 0

    def _body(self, data: bytes) -> tuple[bytes, bool]:
        """Decode ``data``: (the body bytes in it, whether the message is complete)."""
        framing = self._framing
        if framing == _LENGTH:
            left = self._left
            if len(data) < left:
                self._left = left - len(data)
                return data, False
            self._left = 0
            if len(data) > left:
                self._buf = data[left:]  # extra bytes: the connection will not be reused
                return data[:left], True
            return data, True
        if framing == _UNTIL_CLOSE:
            return data, False
        buf = self._buf + data if self._buf else data
        self._buf = b""
        pos = 0
        end = len(buf)
        out: list[bytes] = []
        complete = False
        while pos < end:
            left = self._left
            if left:
                avail = end - pos
                if avail < left:
                    out.append(buf[pos:] if pos else buf)
                    self._left = left - avail
                    pos = end
                    break
                out.append(buf[pos:pos + left])
                pos += left
                self._left = 0
                self._need_crlf = True
            if self._need_crlf:
                if end - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise _BadResponse("bad chunk end")
                pos += 2
                self._need_crlf = False
                continue
            if self._trailers:
                if buf.startswith(b"\r\n", pos):
                    pos += 2
                    complete = True
                    break
                eot = buf.find(b"\r\n\r\n", pos)
                if eot < 0:
                    break
                pos = eot + 4
                complete = True
                break
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if end - pos > _MAX_CHUNK_LINE:
                    raise _BadResponse("chunk size line too long")
                break
            line = buf[pos:eol]
            semi = line.find(b";")
            if semi >= 0:
                line = line[:semi]
            try:
                size = int(line.strip(), 16)
            except ValueError:
                raise _BadResponse("bad chunk size") from None
            if size < 0:
                raise _BadResponse("bad chunk size")
            pos = eol + 2
            if size == 0:
                self._trailers = True
            else:
                self._left = size
        if pos < end:
            self._buf = buf[pos:]
        if complete:
            self._trailers = False
        piece = out[0] if len(out) == 1 else b"".join(out)
        return piece, complete


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
                    response = await conn.send(head, body)
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
        except (_Lost, aiohttp.ClientPayloadError, ConnectionError) as exc:
            raise BackendConnectError(
                f"{what}: connection lost (ServerDisconnectedError)",
                code="backend_connection_lost") from exc
        except _BadResponse as exc:
            raise UpstreamError(f"{what}: ClientResponseError: {exc}",
                                code="backend_error") from exc
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
