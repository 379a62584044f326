"""The head of a request that pdlb's front (lb/serve/front.py) serves itself — or None.

Only the common case is accepted: ``POST /v1/completions`` or ``/v1/chat/completions``,
HTTP/1.1, the whole head within 16 KiB, header lines that llhttp (httptools; the parser of
aiohttp's C extension) finds well-formed, one ``Content-Length`` (ASCII digits) within
``max_body``, and no ``Transfer-Encoding``, ``Expect`` or ``Upgrade``.
Anything else returns None and the front hands the connection to aiohttp, whose parser and
errors are the reference: this one never has to reject, only to recognise.
"""

from __future__ import annotations

from collections.abc import Mapping

import httptools

from lb.request import Endpoint
from lb.serve.routes import COMPLETION_PATHS

ROUTES: Mapping[bytes, Endpoint] = {
    path.encode(): endpoint for path, endpoint in COMPLETION_PATHS.items()}
"""The completion routes of the route table (lb/serve/routes.py), as the request line has
them."""
MAX_HEAD_BYTES = 16384
"""Larger heads go to aiohttp, which applies its own limits (the same 16 KiB) and errors."""
_SPECIAL_HEADERS = frozenset({"content-length", "connection", "transfer-encoding", "expect",
                              "upgrade"})


class _Fields:
    """llhttp's callback for each header line of one head, and what parse_head needs."""

    __slots__ = ("close", "headers", "length", "refused")

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.length = -1
        self.close = False
        self.refused = False  # a header this front leaves to aiohttp

    def on_header(self, raw_name: bytes, raw_value: bytes) -> None:
        name = raw_name.decode("ascii").lower()  # (llhttp let only token bytes through)
        # As aiohttp's parser does, so both servers hand the proxy the same strings.
        value = raw_value.strip(b" \t").decode("utf-8", "surrogateescape")
        if name in _SPECIAL_HEADERS:
            if name == "content-length":
                # llhttp let only digits through, and one Content-Length; int() refuses
                # over 4300 digits, and no body this front serves needs more than 18.
                if len(value) > 18:
                    self.refused = True
                else:
                    self.length = int(value)
            elif name == "connection":
                tokens = {t.strip().lower() for t in value.split(",")}
                if "upgrade" in tokens:
                    self.refused = True
                self.close = self.close or "close" in tokens  # a later one adds to it
            else:  # transfer-encoding, expect, upgrade
                self.refused = True
        if name not in self.headers:
            self.headers[name] = value


class Head:
    """A parsed request head that the front serves itself."""

    __slots__ = ("body_end", "body_start", "close", "endpoint", "headers")

    def __init__(self, endpoint: Endpoint, headers: dict[str, str], body_start: int,
                 body_end: int, close: bool) -> None:
        self.endpoint = endpoint
        self.headers = headers
        self.body_start = body_start
        self.body_end = body_end
        self.close = close


def parse_head(buf: bytes, max_body: int) -> Head | None:
    """The head at the start of ``buf``, or None: not a request this front serves (aiohttp
    will)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0 or end > MAX_HEAD_BYTES:
        return None  # split or huge heads are rare: aiohttp waits for the rest
    # The request line exactly (llhttp would also take extra spaces or a leading CRLF).
    line_end = buf.find(b"\r\n")
    parts = buf[:line_end].split(b" ")
    if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
        return None
    endpoint = ROUTES.get(parts[1])
    if endpoint is None:
        return None
    # The header lines through llhttp (strict: tokens, no control bytes, CRLF, one
    # Content-Length of digits); only the head, so a pipelined request behind is not read.
    fields = _Fields()
    try:
        httptools.HttpRequestParser(fields).feed_data(memoryview(buf)[:end + 4])
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    length = fields.length
    if fields.refused or length < 0 or length > max_body:
        return None  # aiohttp answers a missing length or a too-large body its way
    start = end + 4
    return Head(endpoint, fields.headers, start, start + length, fields.close)
