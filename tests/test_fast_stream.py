"""The fast decode-stream path (lb/backends/http1.py, ``[server] fast_stream``).

The proxy test files run with the fast path on (the default); this module adds what only
the fast path has — its HTTP/1.1 parser, connection reuse, backpressure, the HTTP/1.0
fallback — and re-runs the proxy test files with ``fast_stream = false`` so the aiohttp
path stays covered.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

import lb.config
from lb.backends.http1 import FastClient, _Conn
from lb.errors import BackendConnectError, BackendHTTPError, BackendTimeout, UpstreamError
from lb.serve.app import UPSTREAM
from lb.stream.pipe import DRAIN, Pipe
from tests.conftest import make_config
from tests.fake_vllm import run_app

# ------------------------------------------------------------------ the aiohttp path, again
from tests.test_concurrent_connector import *  # noqa: F403  (collected again, fast_stream off)
from tests.test_faults import *  # noqa: F403
from tests.test_pd_emulator import *  # noqa: F403
from tests.test_proxy_edges import *  # noqa: F403
from tests.test_proxy_edges import pair, sse_events


@pytest.fixture(autouse=True)
def _legacy_path_for_reimported_tests(request: pytest.FixtureRequest,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests imported from other modules run here with the aiohttp stream path.
    (test_concurrent_connector's autouse ``twin`` fixture comes along: it only registers
    its test connector.)"""
    if request.function.__module__ != __name__:
        monkeypatch.setattr(lb.config, "FAST_STREAM_DEFAULT", False)

        async def forbidden(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the fast client was used with fast_stream = false")

        monkeypatch.setattr(FastClient, "_exchange", forbidden)


# ------------------------------------------------------------------ parser (no sockets)
class _FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _conn() -> tuple[_Conn, list[_Conn], _FakeTransport]:
    loop = asyncio.get_running_loop()
    pool: list[_Conn] = []
    conn = _Conn(pool, loop)
    transport = _FakeTransport()
    conn.transport = transport  # type: ignore[assignment]
    return conn, pool, transport


def _splits(raw: bytes) -> Iterator[list[bytes]]:
    yield [raw]
    yield [raw[i:i + 1] for i in range(len(raw))]
    for cut in range(1, len(raw)):
        yield [raw[:cut], raw[cut:]]


async def _parse(pieces: list[bytes]) -> tuple[int, bytes, BaseException | None, bool, bool]:
    conn, pool, transport = _conn()
    waiter = conn.send(b"", b"")
    body: list[bytes] = []
    ended: list[BaseException | None] = []
    for piece in pieces:
        conn.data_received(piece)
        if waiter.done() and not body and not ended:
            waiter.result().start(body.append, ended.append)
    if not waiter.done():
        conn.connection_lost(None)
        return -1, b"", None, False, False
    response = waiter.result()
    if not ended:
        conn.connection_lost(None)
    assert len(ended) == 1
    return response.status, b"".join(body), ended[0], conn in pool, transport.aborted


CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n"
           b"6\r\ndata: \r\n"
           b"a;ext=1\r\n0123456789\r\n"
           b"2\r\n\n\n\r\n"
           b"0\r\n\r\n")


async def test_chunked_at_every_split():
    for pieces in _splits(CHUNKED):
        status, body, error, pooled, aborted = await _parse(pieces)
        assert (status, body, error, pooled, aborted) == (
            200, b"data: 0123456789\n\n", None, True, False), pieces


async def test_chunked_with_trailers_and_interim_answer():
    raw = (b"HTTP/1.1 100 Continue\r\n\r\n" + CHUNKED[:-2] + b"X-T: 1\r\n\r\n")
    for pieces in _splits(raw):
        status, body, error, pooled, _ = await _parse(pieces)
        assert (status, body, error, pooled) == (200, b"data: 0123456789\n\n", None, True)


async def test_content_length_and_close_framings():
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    for pieces in _splits(raw):
        assert await _parse(pieces) == (200, b"hello", None, True, False)
    # Connection: close → never reused
    raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    assert await _parse([raw]) == (200, b"ok", None, False, True)
    # no length: the body runs until the connection closes
    raw = b"HTTP/1.1 200 OK\r\n\r\nuntil close"
    status, body, error, pooled, _ = await _parse([raw])
    assert (status, body, error, pooled) == (200, b"until close", None, False)


async def test_cut_chunked_body_is_an_error_and_never_reused():
    status, body, error, pooled, _ = await _parse([CHUNKED[:-12]])
    assert status == 200 and isinstance(error, BackendConnectError) and not pooled
    assert error.code == "backend_connection_lost"


async def test_garbage_chunk_size_closes_the_connection():
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    conn, pool, transport = _conn()
    waiter = conn.send(b"", b"")
    conn.data_received(raw)  # the head and a bad chunk in one read: no response at all
    error = waiter.exception()
    assert isinstance(error, UpstreamError) and error.code == "invalid_backend_response"
    assert transport.aborted and not pool
    status, _, error, pooled, aborted = await _parse([raw[:-4], raw[-4:]])
    assert status == 200 and isinstance(error, UpstreamError) and aborted and not pooled
    assert error.code == "invalid_backend_response"


# ------------------------------------------------------------------ the client
@pytest.fixture
async def backend() -> AsyncIterator[tuple[str, list[str]]]:
    peers: list[str] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.append(str(request.transport.get_extra_info("peername")))
        if request.path == "/err":
            return web.json_response({"error": {"message": "nope"}}, status=400)
        if request.path == "/slow":
            await asyncio.sleep(5)
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_post("/{tail:.*}", echo)
    async with run_app(app) as url:
        yield url, peers


async def test_client_reuses_connections_and_maps_errors(backend):
    url, peers = backend
    client = FastClient(connect_s=1.0)
    try:
        for i in range(3):
            response = await client.post(url + "/x", b"body%d" % i, {"A": "b"}, timeout_s=5,
                                         what="t")
            assert response.status == 200 and await response.read() == b"body%d" % i
        assert len(set(peers)) == 1  # one keep-alive connection for all three
        with pytest.raises(BackendHTTPError) as info:
            await client.post(url + "/err", b"", {}, timeout_s=5, what="t")
        assert info.value.status == 400 and b"nope" in info.value.raw_body
        assert "nope" in info.value.message
        with pytest.raises(BackendTimeout):
            await client.post(url + "/slow", b"", {}, timeout_s=0.1, what="t")
        with pytest.raises(BackendConnectError) as refused:
            await client.post("http://127.0.0.1:1/x", b"", {}, timeout_s=5, what="t")
        assert refused.value.code == "backend_connect_error"
    finally:
        client.close()


async def test_connection_lost_after_send_is_connection_lost():
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = FastClient(connect_s=1.0)
    try:
        with pytest.raises(BackendConnectError) as info:
            await client.post(f"http://127.0.0.1:{port}/x", b"", {}, timeout_s=5, what="t")
        assert info.value.code == "backend_connection_lost"
    finally:
        client.close()
        server.close()
        await server.wait_closed()


# ------------------------------------------------------------------ through pdlb
@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_fast_path_is_taken_and_reuses_decode_connections(pair, start_pdlb, http):
    p, d, pu, du = pair
    url, app = await start_pdlb(make_config([pu], [du]))
    upstream = app[UPSTREAM]
    for _ in range(3):
        async with http.post(url + "/v1/completions",
                             json={"prompt": "x", "max_tokens": 3, "stream": True,
                                   "stream_options": {"include_usage": True}}) as r:
            assert r.status == 200
            assert r.headers["Transfer-Encoding"] == "chunked"
            events = sse_events(await r.read())
        assert [e["choices"][0]["text"] for e in events[:3]] == ["t0 ", "t1 ", "t2 "]
        assert events[3]["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
        assert events[-1] == "[DONE]"
    assert upstream._http1 is not None
    pools = list(upstream._http1._pools.values())
    # one prefill and one decode connection, each kept alive for all three requests
    assert [len(pool) for pool in pools] == [1, 1]


async def test_fast_stream_off_uses_aiohttp(pair, start_pdlb, http, monkeypatch):
    p, d, pu, du = pair
    url, app = await start_pdlb(make_config([pu], [du], server={"port": 0,
                                                               "fast_stream": False}))
    assert app[UPSTREAM]._http1 is not None
    async with http.post(url + "/v1/completions",
                         json={"prompt": "x", "max_tokens": 2, "stream": True}) as r:
        assert sse_events(await r.read())[-1] == "[DONE]"
    assert not any(app[UPSTREAM]._http1._pools.values())


async def _raw_request(url: str, request: bytes, read_delay_s: float = 0.0,
                       ) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    if read_delay_s:  # a small receive buffer, so the proxy's send buffer fills up
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(request)
    await writer.drain()
    chunks = []
    await asyncio.sleep(read_delay_s)  # let every buffer on the way fill up
    while True:
        data = await reader.read(65536)
        if not data:
            break
        chunks.append(data)
    writer.close()
    return b"".join(chunks)


async def test_http10_client_gets_a_plain_body(pair, start_pdlb):
    p, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    body = orjson.dumps({"prompt": "x", "max_tokens": 3, "stream": True})
    raw = await _raw_request(url, b"POST /v1/completions HTTP/1.0\r\nContent-Type: "
                             b"application/json\r\nContent-Length: %d\r\n\r\n%b"
                             % (len(body), body))
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower()
    assert sse_events(payload)[-1] == "[DONE]"


@pytest.mark.parametrize("fast", [True, False], ids=["http1", "aiohttp"])
async def test_slow_reader_gets_every_byte(start_pdlb, monkeypatch, fast):
    """A big stream to a client that reads slowly: backpressure pauses the decode socket
    and the stream arrives whole, in order, chunk framing intact — whichever client read
    the decode's body (one relay loop for both)."""
    events = [b"data: " + orjson.dumps({"choices": [{"text": f"{i:05d}" + "x" * 4000}]})
              + b"\n\n" for i in range(2000)]

    async def decode(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            await resp.write(event)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    drains = []
    process = Pipe.process

    def counting(self: Pipe, data: bytes) -> Any:
        event = process(self, data)
        if event is not None and event[0] == DRAIN:
            drains.append(1)
        return event

    monkeypatch.setattr(Pipe, "process", counting)
    app = web.Application()
    app.router.add_post("/v1/completions", decode)
    async def health(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/health", health)
    async with run_app(app) as du:
        url, _ = await start_pdlb(make_config(["http://127.0.0.1:1"], [du],
                                              server={"port": 0, "fast_stream": fast},
                                              resilience={"direct_decode_below_tokens": 10**6}))
        body = orjson.dumps({"prompt": "x", "max_tokens": 3, "stream": True})
        raw = await _raw_request(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                 b"Connection: close\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%b" % (len(body), body),
                                 read_delay_s=0.5)
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert b"chunked" in head.lower()
    decoded, pos = [], 0
    while True:
        eol = payload.index(b"\r\n", pos)
        size = int(payload[pos:eol], 16)
        if size == 0:
            break
        decoded.append(payload[eol + 2:eol + 2 + size])
        assert payload[eol + 2 + size:eol + 4 + size] == b"\r\n"
        pos = eol + 4 + size
    assert payload[pos:] == b"0\r\n\r\n"
    assert b"".join(decoded) == b"".join(events) + b"data: [DONE]\n\n"
    assert drains  # the client's buffer did fill up: backpressure was exercised


__all__: list[str] = []  # nothing here is meant for re-import
_unused = (pair,)
