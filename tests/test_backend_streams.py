"""Upstream.open_stream: one stream object whatever the client (aiohttp's or pdlb's HTTP/1.1
client), with pause/resume, close that aborts the backend's request, and errors in lb.errors.

Every test runs against real servers on loopback, once per client (``fast``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from lb.backends.upstream import BackendStream, Upstream
from lb.config import TimeoutsConfig
from lb.errors import BackendConnectError, BackendHTTPError, BackendTimeout
from tests.fake_vllm import run_app

PIECE = b"data: " + b"x" * 65_000 + b"\n\n"
MANY = 400  # 26 MB: far more than every buffer on the way


class Backend:
    """A backend whose /stream writes MANY pieces, /slow one piece then one per 10 ms until
    the connection goes (recording that it was aborted), /err a 400."""

    def __init__(self) -> None:
        self.written = 0
        self.finished = asyncio.Event()
        self.aborted = asyncio.Event()
        self.peers: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        self.peers.append(str(request.transport.get_extra_info("peername")))
        if request.path == "/err":
            return web.json_response({"error": {"message": "bad prompt"}}, status=400)
        if request.path == "/hang":
            await asyncio.sleep(3600)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if request.path == "/stream":
            for _ in range(MANY):
                await resp.write(PIECE)
                self.written += 1
            self.finished.set()
            return resp
        try:
            while True:  # /slow
                await resp.write(b"data: {}\n\n")
                await asyncio.sleep(0.01)
        except (asyncio.CancelledError, ConnectionResetError):
            self.aborted.set()
            raise


@pytest.fixture
async def backend() -> AsyncIterator[tuple[str, Backend]]:
    state = Backend()
    app = web.Application()
    app.router.add_post("/{tail:.*}", state.handle)
    async with run_app(app) as url:
        yield url, state


@pytest.fixture(params=[False, True], ids=["aiohttp", "http1"])
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[Upstream]:
    up = Upstream(TimeoutsConfig(connect_s=2, first_byte_s=0.5), fast=request.param)
    await up.start()
    yield up
    await up.close()


class Collector:
    """The callbacks of one body: pieces, and the end once it comes."""

    def __init__(self, stream: BackendStream, pause_after_first: bool = False) -> None:
        self.stream = stream
        self.size = 0
        self.pieces = 0
        self.pause_after_first = pause_after_first
        self.end: asyncio.Future[BaseException | None] = \
            asyncio.get_running_loop().create_future()
        self.arrived = asyncio.Event()
        stream.start(self.data, self.ended)

    async def until(self, pieces: int) -> None:
        while self.pieces < pieces:
            self.arrived.clear()
            await self.arrived.wait()

    def data(self, data: bytes) -> None:
        self.pieces += 1
        self.size += len(data)
        self.arrived.set()
        if self.pause_after_first and self.pieces == 1:
            self.stream.pause()

    def ended(self, error: BaseException | None) -> None:
        self.end.set_result(error)


async def test_a_whole_body_arrives_and_the_connection_is_reused(backend, upstream):
    """The body ends with on_end(None) and its connection serves the next request."""
    url, state = backend
    for _ in range(2):
        stream = await upstream.open_stream(url + "/stream", b"{}", {}, what="t")
        assert stream.status == 200
        assert stream.headers["content-type"] == "text/event-stream"
        got = Collector(stream)
        assert await got.end is None
        assert got.size == len(PIECE) * MANY
        stream.close()  # after the end: a no-op, the connection is back in its pool
    assert len(set(state.peers)) == 1


async def test_pause_holds_the_backend_and_resume_lets_it_finish(backend, upstream):
    """While paused nothing is delivered and the backend cannot write its whole body
    (backpressure reaches its socket); after resume every byte arrives."""
    url, state = backend
    stream = await upstream.open_stream(url + "/stream", b"{}", {}, what="t")
    got = Collector(stream, pause_after_first=True)
    await got.until(1)
    with pytest.raises(TimeoutError):  # never finishes while we hold it
        await asyncio.wait_for(asyncio.shield(state.finished.wait()), 1.0)
    assert got.pieces == 1 and not got.end.done()
    assert state.written < MANY
    stream.resume()
    assert await got.end is None
    assert got.size == len(PIECE) * MANY


async def test_close_aborts_the_request_on_the_backend(backend, upstream):
    """Closing a body mid-stream closes its connection: the backend's handler sees it go
    (vLLM aborts the request there), and no end callback follows."""
    url, state = backend
    stream = await upstream.open_stream(url + "/slow", b"{}", {}, what="t")
    got = Collector(stream)
    await got.until(2)
    stream.close()
    await asyncio.wait_for(state.aborted.wait(), 10)
    await asyncio.sleep(0.05)
    assert not got.end.done()


async def test_close_from_inside_on_data(backend, upstream):
    """A consumer may close the body from its data callback (the relay does, when the
    client left): delivery stops there."""
    url, state = backend
    stream = await upstream.open_stream(url + "/slow", b"{}", {}, what="t")
    pieces: list[bytes] = []

    def data(piece: bytes) -> None:
        pieces.append(piece)
        stream.close()

    stream.start(data, lambda error: pieces.append(b"END"))
    await asyncio.wait_for(state.aborted.wait(), 10)
    assert len(pieces) == 1 and pieces[0] != b"END"


async def test_head_errors_are_lb_errors(backend, upstream):
    """A 4xx passes the backend's body on; no head in first_byte_s is a timeout; a refused
    connection is a connect error."""
    url, _ = backend
    with pytest.raises(BackendHTTPError) as http:
        await upstream.open_stream(url + "/err", b"{}", {}, what="t")
    assert http.value.status == 400 and "bad prompt" in http.value.message
    with pytest.raises(BackendTimeout):
        await upstream.open_stream(url + "/hang", b"{}", {}, what="t")
    with pytest.raises(BackendConnectError) as refused:
        await upstream.open_stream("http://127.0.0.1:1/x", b"{}", {}, what="t")
    assert refused.value.code == "backend_connect_error"


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ndata: cut\n\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nb\r\ndata: cut\n\n\r\n",
], ids=["content-length", "chunked"])
async def test_a_cut_body_ends_with_connection_lost(upstream, answer):
    """A body cut by the backend ends with BackendConnectError(backend_connection_lost)
    whichever client read it — never a transport's own exception."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        stream = await upstream.open_stream(f"http://127.0.0.1:{port}/x", b"", {}, what="t")
        got = Collector(stream)
        error = await got.end
        assert isinstance(error, BackendConnectError)
        assert error.code == "backend_connection_lost"
        assert got.size == len(b"data: cut\n\n")
    finally:
        server.close()
        await server.wait_closed()
