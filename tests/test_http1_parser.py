"""pdlb's HTTP/1.1 client on malformed backend answers (lb/backends/http1.py over llhttp).

A raw TCP server on loopback writes exactly the bytes under test. The differential tests give
the same bytes to aiohttp's client (the reference: its C parser is llhttp too) and to
FastClient and compare accept/reject; the few places where pdlb is deliberately stricter are
listed with their reason. Every refusal must be a 502 ``invalid_backend_response`` — never a
``backend_connection_lost``, a timeout, or a traceback from a transport callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from lb.backends.h1response import BadResponse, ResponseParser
from lb.backends.http1 import FastClient
from lb.errors import UpstreamError
from loadgen.transport import ProtocolError, _Exchange
from tests.conftest import make_config

Answer = Callable[[bytes], bytes]
"""The bytes to write back for a request's head (GET /health gets its own answer)."""

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HEALTH = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class RawBackend:
    """Answers each request on a connection with ``answer(head)``, written as is; counts
    connections; closes after an answer when ``close`` is set."""

    def __init__(self, answer: Answer, close: bool = True) -> None:
        self.answer = answer
        self.close = close
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self.url

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.partition(b":")[2])
                await reader.readexactly(length)
                health = head.startswith(b"GET /health")
                writer.write(HEALTH if health else self.answer(head))
                await writer.drain()
                if self.close and not health:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def raw_backend() -> AsyncIterator[Callable[..., Any]]:
    backends: list[RawBackend] = []

    async def start(answer: bytes | Answer, close: bool = True) -> RawBackend:
        backend = RawBackend(answer if callable(answer) else (lambda head: answer), close)
        await backend.start()
        backends.append(backend)
        return backend

    yield start
    for backend in backends:
        await backend.stop()


@pytest.fixture
async def loop_errors() -> list[dict[str, Any]]:
    """What reaches the loop's exception handler ("Fatal error on transport" and the like)."""
    seen: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: seen.append(context))
    return seen


async def fast_outcome(url: str, **kwargs: Any) -> str:
    """"ok <status> <body>" or the error code FastClient gives for the answer."""
    client = FastClient(connect_s=5.0)
    try:
        body = await client.post_read(url + "/v1/completions", b"{}", {}, timeout_s=10,
                                      what="t", **kwargs)
        return f"ok {body!r}"
    except UpstreamError as exc:
        return str(exc.code)
    finally:
        client.close()


async def aiohttp_outcome(url: str) -> str:
    async with aiohttp.ClientSession() as session:
        try:
            async with asyncio.timeout(10):
                async with session.post(url + "/v1/completions", data=b"{}") as resp:
                    return f"ok {resp.status} {await resp.read()!r}"
        except aiohttp.ClientResponseError as exc:
            return f"rejected: {exc.message.splitlines()[0]}"


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
A26 = b"a" * 26

# (name, answer, accepted): aiohttp and pdlb agree on each.
AGREE = [
    ("content-length", OK, True),
    ("chunked", CHUNKED_HEAD + b"1a\r\n" + A26 + b"\r\n0\r\n\r\n", True),
    ("chunk extension", CHUNKED_HEAD + b"1a;x=y\r\n" + A26 + b"\r\n0\r\n\r\n", True),
    ("trailers", CHUNKED_HEAD + b"2\r\nok\r\n0\r\nX-T: 1\r\n\r\n", True),
    ("no reason phrase", b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok", True),
    ("100 Continue first", b"HTTP/1.1 100 Continue\r\n\r\n" + OK, True),
    ("103 Early Hints first", b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + OK, True),
    ("HTTP/1.0 until close", b"HTTP/1.0 200 OK\r\n\r\nok", True),
    ("no length: until close", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nok", True),
    ("non-ASCII status digit", b"HTTP/1.1 2\xb2 OK\r\nContent-Length: 2\r\n\r\nok", False),
    ("four-digit status", b"HTTP/1.1 1000 X\r\nContent-Length: 2\r\n\r\nok", False),
    ("two-digit status", b"HTTP/1.1 20 X\r\nContent-Length: 2\r\n\r\nok", False),
    ("HTTP/1.2", b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    ("not HTTP", b"SSH-2.0-OpenSSH_9.6\r\n\r\n", False),
    ("Content-Length: +2", b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok", False),
    ("Content-Length: 1_0", b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\n" + b"x" * 10,
     False),
    ("Content-Length: -1", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nok", False),
    ("Content-Length: 2, 2", b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", False),
    ("two Content-Lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n"
     b"\r\nok", False),
    ("chunk size 0x1a", CHUNKED_HEAD + b"0x1a\r\n" + A26 + b"\r\n0\r\n\r\n", False),
    ("chunk size +1a", CHUNKED_HEAD + b"+1a\r\n" + A26 + b"\r\n0\r\n\r\n", False),
    ("chunk without its CRLF", CHUNKED_HEAD + b"2\r\nokXX0\r\n\r\n", False),
    ("Content-Length with Transfer-Encoding",
     b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"2\r\nok\r\n0\r\n\r\n", False),
    ("NUL in a header value", b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\nok",
     False),
]

# (name, answer, why pdlb refuses what aiohttp's client lets through)
STRICTER = [
    ("status 000", b"HTTP/1.1 000 X\r\nContent-Length: 2\r\n\r\nok",
     "not a status (aiohttp hands on status 0; pdlb treated it as a success)"),
    ("status 099", b"HTTP/1.1 099 X\r\nContent-Length: 2\r\n\r\nok", "below 100"),
    ("status 600", b"HTTP/1.1 600 X\r\nContent-Length: 2\r\n\r\nok", "above 599"),
    ("101 Switching Protocols", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n"
     b"Connection: upgrade\r\n\r\n", "a POST never asks to switch protocols"),
    ("HTTP/2.0 status line", b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
     "HTTP/2 does not have HTTP/1.1 framing"),
    ("RTSP status line", b"RTSP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "not HTTP"),
    # aiohttp turns on llhttp's leniencies outside dev mode; pdlb does not (h1response.py)
    ("LF without CR", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", "llhttp leniency"),
    ("space before the colon", b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
     "llhttp leniency"),
    ("folded header", b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
     "llhttp leniency"),
    ("space after a chunk size", CHUNKED_HEAD + b"2 \r\nok\r\n0\r\n\r\n", "llhttp leniency"),
]


@pytest.mark.parametrize(("name", "answer", "accepted"), AGREE, ids=[c[0] for c in AGREE])
async def test_accepts_and_rejects_as_aiohttp_does(raw_backend, loop_errors, name, answer,
                                                   accepted):
    """The same bytes: accepted (with the same body) or refused by both clients."""
    backend = await raw_backend(answer)
    reference = await aiohttp_outcome(backend.url)
    ours = await fast_outcome(backend.url)
    assert reference.startswith("ok 200") == accepted, reference
    if accepted:
        assert ours == "ok " + reference.split(" ", 2)[2]
    else:
        assert ours == "invalid_backend_response"
    assert not loop_errors


@pytest.mark.parametrize(("name", "answer", "why"), STRICTER, ids=[c[0] for c in STRICTER])
async def test_stricter_than_aiohttp_where_listed(raw_backend, loop_errors, name, answer, why):
    """Where pdlb refuses what aiohttp takes, on purpose (if aiohttp starts refusing one too,
    move it to AGREE)."""
    backend = await raw_backend(answer)
    assert (await aiohttp_outcome(backend.url)).startswith("ok"), why
    assert await fast_outcome(backend.url) == "invalid_backend_response"
    assert not loop_errors


async def test_bad_status_line_is_not_a_traceback_from_the_transport(raw_backend, loop_errors):
    """``2\\xb2`` once raised ValueError out of data_received: a "Fatal error on transport"
    traceback and a 502 that blamed a lost connection."""
    backend = await raw_backend(b"HTTP/1.1 2\xb2 OK\r\nContent-Length: 2\r\n\r\nok",
                                close=False)
    client = FastClient(connect_s=5.0)
    try:
        with pytest.raises(UpstreamError) as info:
            await client.post(backend.url + "/x", b"{}", {}, timeout_s=10, what="decode x")
    finally:
        client.close()
    assert info.value.code == "invalid_backend_response" and info.value.status == 502
    assert info.value.message.startswith("decode x: invalid HTTP response")
    assert not loop_errors


async def test_101_is_refused_not_waited_on(raw_backend):
    """A 101 is not an interim answer: refused at once, not a first-byte timeout."""
    backend = await raw_backend(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", close=False)
    assert await fast_outcome(backend.url) == "invalid_backend_response"


async def test_interim_answers_are_skipped_in_any_number(raw_backend):
    backend = await raw_backend(b"HTTP/1.1 100 Continue\r\n\r\n" * 3
                                + b"HTTP/1.1 102 Processing\r\n\r\n" + OK)
    assert await fast_outcome(backend.url) == "ok b'ok'"


async def test_huge_trailers_are_refused(raw_backend, loop_errors):
    """Trailers are bounded (64 KiB): 10 MB of them were once buffered whole."""
    trailers = b"X-T: " + b"a" * 1000 + b"\r\n"
    backend = await raw_backend(CHUNKED_HEAD + b"2\r\nok\r\n0\r\n" + trailers * 10_000
                                + b"\r\n")
    assert await fast_outcome(backend.url) == "invalid_backend_response"
    assert not loop_errors


async def test_one_endless_trailer_line_is_refused(raw_backend):
    backend = await raw_backend(CHUNKED_HEAD + b"2\r\nok\r\n0\r\nX-T: " + b"a" * 1_000_000)
    assert await fast_outcome(backend.url) == "invalid_backend_response"


async def test_huge_head_is_refused(raw_backend):
    backend = await raw_backend(b"HTTP/1.1 200 OK\r\n" + b"X-H: " + b"h" * 100_000
                                + b"\r\nContent-Length: 2\r\n\r\nok", close=False)
    assert await fast_outcome(backend.url) == "invalid_backend_response"


async def test_malformed_body_ends_the_stream_with_invalid_response(raw_backend):
    """The head was fine, the body is not: the stream ends with the 502's error (a stream
    whose 200 is already out tells its client in-band)."""
    sent = asyncio.Event()
    parts = [CHUNKED_HEAD, b"2\r\nok\r\nzz\r\n"]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        writer.write(parts[0])
        await sent.wait()  # the body after the client has the head: two reads
        writer.write(parts[1])
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = FastClient(connect_s=5.0)
    try:
        response = await client.post(url + "/x", b"{}", {}, timeout_s=10, what="decode x")
        assert response.status == 200
        got: list[bytes] = []
        ended: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        response.start(got.append, ended.set_result)
        sent.set()
        error = await asyncio.wait_for(ended, 10)
    finally:
        client.close()
        server.close()
        await server.wait_closed()
    assert isinstance(error, UpstreamError) and error.code == "invalid_backend_response"
    assert b"".join(got) == b"ok"  # the good bytes of the read, before its fault


async def test_extra_bytes_after_the_answer_forbid_reuse(raw_backend):
    """Bytes after the end of a response (here: a second, unasked-for one) mean the
    connection is out of step: closed, and the next request opens a new one."""
    backend = await raw_backend(OK + OK, close=False)
    client = FastClient(connect_s=5.0)
    try:
        for _ in range(2):
            assert await client.post_read(backend.url + "/x", b"{}", {}, timeout_s=10,
                                          what="t") == b"ok"
    finally:
        client.close()
    assert backend.connections == 2


async def test_a_clean_answer_is_reused(raw_backend):
    backend = await raw_backend(OK, close=False)
    client = FastClient(connect_s=5.0)
    try:
        for _ in range(3):
            assert await client.post_read(backend.url + "/x", b"{}", {}, timeout_s=10,
                                          what="t") == b"ok"
    finally:
        client.close()
    assert backend.connections == 1


@pytest.mark.parametrize("fast", [True, False], ids=["pdlb-client", "aiohttp-client"])
async def test_pdlb_answers_502_invalid_backend_response(raw_backend, start_pdlb, loop_errors,
                                                        fast):
    """Through pdlb, streamed and not, whichever backend client: the client sees the
    backend's fault for what it is."""
    async with aiohttp.ClientSession() as session:
        for stream in (False, True):  # (one pdlb each: a failure may eject the backend)
            backend = await raw_backend(b"HTTP/1.1 1000 X\r\nContent-Length: 2\r\n\r\nok",
                                        close=False)
            config = make_config(["http://127.0.0.1:1"], [backend.url],
                                 server={"port": 0, "fast_stream": fast},
                                 resilience={"direct_decode_below_tokens": 10**6})
            url, _ = await start_pdlb(config)
            async with session.post(url + "/v1/completions",
                                    json={"prompt": "x", "max_tokens": 3,
                                          "stream": stream}) as r:
                body = orjson.loads(await r.read())
            assert r.status == 502, body
            assert body["error"]["code"] == "invalid_backend_response"
    assert not loop_errors


# ------------------------------------------------------------------ the parser alone
def _feed_all(raw: bytes, split: int) -> tuple[ResponseParser, bytes]:
    parser = ResponseParser()
    body = b"".join(parser.feed(raw[i:i + split]) for i in range(0, len(raw), split))
    return parser, body


@pytest.mark.parametrize("split", [1, 2, 5, 1000])
def test_parser_at_any_read_boundary(split: int) -> None:
    raw = (b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + CHUNKED_HEAD[:-2]
           + b"Content-Type: text/event-stream\r\nX-Two: a\r\nx-two: b\r\n\r\n"
           + b"6\r\ndata: \r\n" + b"a;ext=1\r\n0123456789\r\n2\r\n\n\n\r\n0\r\nX-T: 1\r\n\r\n")
    parser, body = _feed_all(raw, split)
    assert (parser.status, body, parser.complete, parser.keep_alive, parser.extra) == (
        200, b"data: 0123456789\n\n", True, True, False)
    assert parser.headers == {"transfer-encoding": "chunked",
                              "content-type": "text/event-stream", "x-two": "a, b"}


def test_parser_one_read_of_many_chunks_is_one_piece() -> None:
    """A read's body pieces come back joined: one call into the relay per read."""
    parser = ResponseParser()
    assert parser.feed(CHUNKED_HEAD) == b""
    assert parser.feed(b"1\r\na\r\n1\r\nb\r\n1\r\nc\r\n") == b"abc"


def test_parser_until_close_ends_at_eof_and_cut_bodies_do_not() -> None:
    parser, body = _feed_all(b"HTTP/1.1 200 OK\r\n\r\npartial", 1000)
    assert body == b"partial" and not parser.complete and parser.eof()
    assert not parser.keep_alive
    parser, _ = _feed_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npartial", 1000)
    assert not parser.eof()
    parser, _ = _feed_all(CHUNKED_HEAD + b"2\r\nok\r\n", 1000)
    assert not parser.eof()


def test_parser_connection_close_is_not_kept_alive() -> None:
    parser, _ = _feed_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
                          1000)
    assert parser.complete and not parser.keep_alive
    parser, _ = _feed_all(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2"
                          b"\r\n\r\nok", 1000)
    assert parser.complete and parser.keep_alive


def test_parser_refuses_after_an_error() -> None:
    parser = ResponseParser()
    with pytest.raises(BadResponse):
        parser.feed(b"HTTP/1.1 2\xb2 OK\r\n\r\n")
    assert parser.feed(b"more") == b"" and not parser.complete


# ------------------------------------------------------------------ the other two users
REFUSED = [(name, raw) for name, raw, accepted in AGREE if not accepted] + [
    (name, raw) for name, raw, _ in STRICTER]


@pytest.mark.parametrize(("name", "answer"), REFUSED, ids=[c[0] for c in REFUSED])
def test_loadgen_and_bench_client_refuse_the_same(name: str, answer: bytes) -> None:
    """One parser for three clients: the loadgen's transport and the bench client refuse
    what pdlb's client refuses."""
    bench = str(Path(__file__).resolve().parent.parent / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)  # (bench/ is not a package)
    import client as bench_client

    loop = asyncio.new_event_loop()
    try:
        exchange = _Exchange(lambda data, now: None, loop.create_future())
        with pytest.raises(ProtocolError):
            exchange.feed(answer)
        conn = bench_client.Conn()
        conn.transport = _Sink()
        done: asyncio.Future[Any] = loop.create_future()
        conn.request(b"", done, 0.0)
        conn.data_received(answer)
        assert done.result().error.startswith("bad_response")
    finally:
        loop.close()


class _Sink:
    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass
