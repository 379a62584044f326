"""Raw HTTP/1.1 over a socket, for the tests of pdlb's front: request bytes exactly as
written, responses read whole (Content-Length or chunked), every wait bounded."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable
from typing import TypeVar

import orjson

T = TypeVar("T")

BODY = orjson.dumps({"model": "fake", "prompt": "hello", "max_tokens": 3})
STREAM_BODY = orjson.dumps({"model": "fake", "prompt": "hello", "max_tokens": 3,
                            "stream": True})


def post(path: str = "/v1/completions", body: bytes = BODY, extra: str = "",
         version: str = "HTTP/1.1") -> bytes:
    return (f"POST {path} {version}\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def bounded(aw: Awaitable[T], limit_s: float = 10.0) -> T:
    return await asyncio.wait_for(aw, limit_s)


class Client:
    """A raw connection that reads whole HTTP/1.x responses (Content-Length or chunked)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await bounded(self.writer.drain())

    async def head(self) -> tuple[int, dict[str, str]]:
        raw = await bounded(self.reader.readuntil(b"\r\n\r\n"))
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return status, headers

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = await self.head()
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int((await bounded(self.reader.readuntil(b"\r\n")))[:-2], 16)
                data = await bounded(self.reader.readexactly(size + 2))
                if size == 0:
                    break
                body += data[:-2]
        else:
            length = int(headers.get("content-length", "0"))
            body = await bounded(self.reader.readexactly(length))
        return status, headers, body

    async def closed_by_server(self, limit_s: float = 5.0) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), limit_s) == b""
        except ConnectionResetError:
            return True

    def reset(self) -> None:
        """Leave abruptly (RST), as a killed client does."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.writer.close()
