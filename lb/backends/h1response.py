"""One HTTP/1.1 response parser for pdlb's own clients: llhttp, with a client's checks on top.

Three clients read responses without aiohttp — the decode leg (lb/backends/http1.py), the
load generator (loadgen/transport.py) and the benchmark client (bench/client.py) — and each
had its own hand-written parser, each with its own gaps (a status of ``2\\xb2`` or ``1000``,
``Content-Length: +5``, chunk sizes like ``0x1a``, unbounded trailers). They now share this
one. The parsing itself is llhttp's (through ``httptools``, the bindings under uvicorn):
the parser of Node.js and of aiohttp's C extension, fuzzed and maintained by people whose
job it is. The same-run micro-benchmark is in docs/performance.md.

llhttp runs strict: no leniency flags. aiohttp turns three on outside dev mode (header
bytes llhttp refuses, LF without CR, spaces after a chunk size); pdlb's backends are vLLM
servers, whose HTTP stacks send none of these, and an answer that needs them is more likely
a desynchronised keep-alive connection than a server to accommodate.

What this module adds to llhttp, because llhttp leaves it to its caller:

- a status from 100 to 599 (llhttp passes ``000`` and ``999``) and a version of HTTP/1.0 or
  1.1 (llhttp also takes ``HTTP/2.0``, ``RTSP/`` and ``ICE/``);
- interim answers (100, 102, 103) skipped; ``101 Switching Protocols`` is an error, since a
  POST from these clients never asks to switch;
- a bound on the bytes that are not body — the head with its interim answers, chunk
  trailers — of ``max_head``, counted per read: llhttp itself has none;
- the end of the response, whether anything followed it in the same read (then the
  connection is not reused), and the end at EOF of a body without a length.
"""

from __future__ import annotations

import httptools

MAX_HEAD = 64 * 1024
"""Bytes of head (interim answers included) or of trailers before the answer is refused."""


class BadResponse(ValueError):
    """The bytes are not an HTTP/1.1 response this parser accepts."""

    body = b""
    """The body bytes of the same read before the fault (aiohttp delivers those too)."""


class _After(Exception):
    """Raised inside llhttp's callback when a second response begins: stops the parse."""


class ResponseParser:
    """One response, fed read by read: its head, its body bytes, its end.

    :meth:`feed` returns the body bytes of each read (the pieces of one read joined, so a
    read costs its consumer one call whatever the chunking); the head's fields are set
    once :attr:`status` is non-zero. Nothing is called back into the consumer while llhttp
    runs, so a consumer's exception never passes through the C parser.
    """

    __slots__ = ("_error", "_head_bytes", "_names", "_parser", "_pieces", "_prefix", "_run",
                 "_values", "complete", "extra", "headers", "keep_alive", "max_head",
                 "started", "status", "until_close")

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self.max_head = max_head
        self.status = 0
        """The final answer's status; 0 until its head is complete."""
        self.headers: dict[str, str] = {}
        """Lower-case names; values decoded as aiohttp decodes them (UTF-8, surrogateescape);
        a repeated header's values joined by ", "."""
        self.keep_alive = False
        """The server lets the connection carry another request (HTTP/1.1 without
        ``Connection: close``, or 1.0 with keep-alive, and a body with a known end)."""
        self.until_close = False
        """The body has neither a length nor chunks: it ends when the connection does."""
        self.complete = False
        self.extra = False
        """Bytes followed the end of the response: the connection is not to be reused."""
        self.started = False
        """Any byte was fed (a kept-alive connection that dies before one may be retried)."""
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._pieces: list[bytes] = []
        self._names: list[bytes] = []
        self._values: list[bytes] = []
        self._run = 0  # bytes fed since the last read that carried body bytes
        self._head_bytes = 0  # of the header and trailer lines llhttp handed over
        self._prefix = b""  # the response's first bytes, until five are seen
        self._error: BadResponse | None = None

    def feed(self, data: bytes) -> bytes:
        """Parse one read; return the body bytes it held (``b""`` if none).

        Raises :class:`BadResponse` when the bytes are not a response this parser accepts.
        Bytes fed after the end are not parsed: they set :attr:`extra`.
        """
        parser = self._parser
        if parser is None:
            if data:
                self.extra = True
            return b""
        if not self.started:
            self.started = True
        if len(self._prefix) < 5:
            self._check_prefix(data)
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self.complete:
                self.extra = True  # a second response, or bytes after Connection: close
            else:
                self._parser = None
                error = self._error or BadResponse(str(exc) or type(exc).__name__)
                error.body = b"".join(self._pieces)
                raise error from None
        pieces = self._pieces
        if pieces:
            body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces.clear()
            self._run = 0
        else:
            body = b""
            # Not a byte of body in this read: head, interim answers or trailers.
            self._run += len(data)
            if self._run > self.max_head and not self.complete:
                self._parser = None
                raise BadResponse(f"over {self.max_head} bytes of head or trailers")
        if self.complete:
            self._parser = None  # (llhttp holds this object's methods: break the cycle)
        return body

    def eof(self) -> bool:
        """The connection ended: whether the response is whole (a body without a length
        ends here; anything else cut short is not)."""
        self._parser = None
        if not self.complete and self.status and self.until_close:
            self.complete = True
        return self.complete

    def close(self) -> None:
        """The response is abandoned: nothing more will be fed."""
        self._parser = None  # (llhttp holds this object's methods: break the cycle)

    def _check_prefix(self, data: bytes) -> None:
        prefix = self._prefix + data[:5 - len(self._prefix)]
        self._prefix = prefix
        if not b"HTTP/".startswith(prefix):
            self._parser = None
            raise BadResponse(f"not an HTTP/1.x response: {prefix!r}")

    # -- llhttp's callbacks (names fixed by httptools)
    def on_message_begin(self) -> None:
        if self.complete:
            raise _After

    def on_header(self, name: bytes, value: bytes) -> None:
        # Counted here for a head that arrives in one read with body bytes (the per-read
        # count in feed() sees only reads without any), and for lines split across reads.
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.max_head:
            self._error = BadResponse(f"over {self.max_head} bytes of head or trailers")
            raise self._error
        if not self.status:  # trailers are read (and bounded) but not kept
            self._names.append(name)
            self._values.append(value)

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        names, values = self._names, self._values
        self._names, self._values = [], []
        if 100 <= status < 200:
            if status == 101:
                self._error = BadResponse("101 Switching Protocols in answer to a POST")
                raise self._error
            return  # an interim answer; the real one follows
        if not 200 <= status <= 599:
            self._error = BadResponse(f"status {status:03d} is not an HTTP status")
            raise self._error
        if parser.get_http_version() not in ("1.1", "1.0"):
            self._error = BadResponse(f"HTTP/{parser.get_http_version()} is not HTTP/1.x")
            raise self._error
        headers: dict[str, str] = {}
        for raw_name, raw_value in zip(names, values, strict=True):
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("utf-8", "surrogateescape")
            if name in headers:
                headers[name] += ", " + value
            else:
                headers[name] = value
        self.headers = headers
        self.keep_alive = parser.should_keep_alive()  # (llhttp resets it at the end)
        te = headers.get("transfer-encoding")
        chunked = te is not None and te.rpartition(",")[2].strip().lower() == "chunked"
        self.until_close = (status not in (204, 304) and not chunked
                            and "content-length" not in headers)
        self.status = status

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)

    def on_message_complete(self) -> None:
        if self.status:  # (an interim answer's end is not the response's)
            self.complete = True
