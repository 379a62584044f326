"""The head of a request that pdlb's front (lb/serve/front.py) serves itself — or None.

Only the common case is accepted: ``POST /v1/completions`` or ``/v1/chat/completions``,
HTTP/1.1, the whole head within 16 KiB, well-formed header lines, one ``Content-Length``
(ASCII digits) within ``max_body``, and no ``Transfer-Encoding``, ``Expect`` or ``Upgrade``.
Anything else returns None and the front hands the connection to aiohttp, whose parser and
errors are the reference: this one never has to reject, only to recognise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from lb.request import Endpoint

ROUTES: Mapping[bytes, Endpoint] = {
    b"/v1/completions": "completions",
    b"/v1/chat/completions": "chat",
}
MAX_HEAD_BYTES = 16384
"""Larger heads go to aiohttp, which applies its own limits (the same 16 KiB) and errors."""
_HEADER_LINES = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
_SPECIAL_HEADERS = frozenset({"content-length", "connection", "transfer-encoding", "expect",
                              "upgrade"})


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
    line_end = buf.find(b"\r\n")
    parts = buf[:line_end].split(b" ")
    if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
        return None
    endpoint = ROUTES.get(parts[1])
    if endpoint is None:
        return None
    # Every header line at once (C speed): a token, a colon, a value without control bytes.
    if not _HEADER_LINES.fullmatch(buf, line_end + 2, end + 2):
        return None
    headers: dict[str, str] = {}
    length = -1
    close = False
    for line in buf[line_end + 2:end].split(b"\r\n"):
        raw_name, _, raw_value = line.partition(b":")
        name = raw_name.decode("ascii").lower()
        # As aiohttp's parser does, so both servers hand the proxy the same strings.
        value = raw_value.strip(b" \t").decode("utf-8", "surrogateescape")
        if name in _SPECIAL_HEADERS:
            if name == "content-length":
                # int() refuses over 4300 digits (ValueError inside data_received); no
                # body this front serves needs more than 18.
                if length >= 0 or len(value) > 18 or not (value.isascii() and value.isdigit()):
                    return None
                length = int(value)
            elif name == "connection":
                tokens = {t.strip().lower() for t in value.split(",")}
                if "upgrade" in tokens:
                    return None
                close = close or "close" in tokens  # a later Connection header adds to it
            else:  # transfer-encoding, expect, upgrade
                return None
        if name not in headers:
            headers[name] = value
    if length < 0 or length > max_body:
        return None  # aiohttp answers a missing length or a too-large body its way
    start = end + 4
    return Head(endpoint, headers, start, start + length, close)
