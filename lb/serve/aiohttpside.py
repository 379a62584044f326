"""The client of a request that aiohttp's server received, behind the proxy's port."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.http import HttpProcessingError, StreamWriter

from lb.errors import InvalidRequest, PayloadTooLarge
from lb.serve.guard import ErrorAnswer, Guard, ServedClient
from lb.stream.port import SSE_HEADERS


class AiohttpSide(ServedClient):
    """A request that aiohttp's server received; :attr:`response` is the handler's return."""

    __slots__ = ("_guard", "_http", "_writer", "headers", "record", "response")

    def __init__(self, http: web.Request, guard: Guard) -> None:
        self._http = http
        self._guard = guard
        # The first value of a repeated header, as documented (and as the front and the
        # guard read it): a later one must not replace the checked one.
        headers: dict[str, str] = {}
        for name, value in http.headers.items():
            headers.setdefault(name.lower(), value)
        self.headers = headers
        self.response: web.StreamResponse | None = None
        self._writer: Any = None

    @property
    def status(self) -> int:
        return 0 if self.response is None else self.response.status

    def peer(self) -> str:
        return self._http.remote or "-"

    async def body(self) -> bytes:
        """The body, with aiohttp's errors in pdlb's terms: too large (413), malformed
        framing (400), too slow (408)."""
        try:
            async with asyncio.timeout(self._guard.body_timeout_s):
                return await self._http.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(
                f"request body is larger than the limit of {self._http.client_max_size} bytes",
                code="body_too_large") from None
        except HttpProcessingError as exc:
            raise InvalidRequest(f"malformed request body: {exc.message}",
                                 code="invalid_body") from None
        except TimeoutError:
            raise self._guard.body_timeout() from None

    async def send_json(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.response = web.Response(body=body, status=status, content_type="application/json",
                                     headers=dict(headers))

    def send_error(self, answer: ErrorAnswer) -> None:
        response = self.response
        if response is not None and response.prepared:
            response.force_close()  # a stream is under way: end it with the connection
            return
        response = self.response = web.Response(
            body=answer.body, status=answer.status, content_type="application/json",
            headers=answer.headers or None)
        if answer.close:
            response.force_close()

    async def start_stream(self, headers: Mapping[str, str]) -> None:
        response = self.response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
        self._writer = await response.prepare(self._http)

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def end(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def direct(self) -> tuple[asyncio.Transport, Any] | None:
        writer = self._writer
        response = self.response
        # Raw chunked writes are only right on a plain chunked HTTP/1.1 response.
        if (self._http.version == HttpVersion11 and isinstance(writer, StreamWriter)
                and writer.chunked and writer.length is None and writer.transport is not None
                and response is not None and "Content-Encoding" not in response.headers):
            return writer.transport, writer.protocol
        return None

    async def drain(self) -> None:
        assert isinstance(self._writer, StreamWriter)
        await self._writer.drain()
