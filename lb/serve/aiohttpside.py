"""The client of a request that aiohttp's server received, behind the proxy's port."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.http_writer import StreamWriter

from lb.stream.port import SSE_HEADERS, ClientSide


class AiohttpSide(ClientSide):
    """A request that aiohttp's server received; :attr:`response` is the handler's return."""

    __slots__ = ("_http", "_writer", "headers", "response")

    def __init__(self, http: web.Request) -> None:
        self._http = http
        # The first value of a repeated header, as documented (and as the front and the
        # auth middleware read it): a later one must not replace the checked one.
        headers: dict[str, str] = {}
        for name, value in http.headers.items():
            headers.setdefault(name.lower(), value)
        self.headers = headers
        self.response: web.StreamResponse | None = None
        self._writer: Any = None

    async def body(self) -> bytes:
        return await self._http.read()

    async def send_json(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.response = web.Response(body=body, status=status, content_type="application/json",
                                     headers=dict(headers))

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
