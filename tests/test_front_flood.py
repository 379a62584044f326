"""A client that pipelines requests and does not read the answers (denial of service).

Before the fix, one unauthenticated connection sending ``b"POST /v1/completions ...
Content-Length: 1\\r\\n\\r\\n{" * 258_000`` (16 MB) and never reading was read whole by the
front, kept its core busy for a minute and grew pdlb's memory without bound for a sender
that never stops. Each test here runs the same bytes against both fronts (``fast_front``
true: lb/serve/front.py; false: aiohttp's server, the reference) and checks what pdlb
accepts, what it holds in memory, that other clients are still served, and that the
connection is answered in order once its client reads. No timing assertions: "the sender
stalled" means a ``send`` that made no progress for ``STALL_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lb.serve.app import METRICS
from tests.conftest import make_config
from tests.fake_vllm import FakeBehaviour, make_fake, run_app
from tests.rawhttp import Client, bounded, post

ONE = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n{"
BURST = ONE * 258_000  # 16 MB of 400s (the body is not JSON)
STALL_S = 2.0
SMALL_BUF = 1 << 16


@pytest.fixture
async def pair() -> AsyncIterator[tuple[str, str]]:
    async with run_app(make_fake("prefill", FakeBehaviour())) as pu, \
            run_app(make_fake("decode", FakeBehaviour())) as du:
        yield pu, du


def rss_bytes() -> int:
    """This process's resident memory (pdlb runs in it, on the test's loop)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


async def flood_socket(url: str) -> socket.socket:
    """A client socket with small kernel buffers of its own: what pdlb accepts is then
    mostly what pdlb's side holds, not the client's."""
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUF)
    sock.setblocking(False)
    await bounded(asyncio.get_running_loop().sock_connect(sock, (host, int(port))))
    return sock


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def send_until_stalled(sock: socket.socket, payload: bytes, piece: int = 1 << 20,
                             pace_s: float = 0.0) -> int:
    """Send ``payload`` without reading anything; return the bytes the kernel took before
    a send made no progress for STALL_S (or all of them)."""
    loop = asyncio.get_running_loop()
    view = memoryview(payload)
    sent = 0
    while sent < len(payload):
        try:
            sent += sock.send(view[sent:sent + piece])
            if pace_s:
                await asyncio.sleep(pace_s)
            continue
        except BlockingIOError:
            pass
        writable: asyncio.Future[None] = loop.create_future()
        loop.add_writer(sock.fileno(), _wake, writable)
        try:
            await asyncio.wait_for(writable, STALL_S)
        except TimeoutError:
            break
        finally:
            loop.remove_writer(sock.fileno())
    return sent


async def served_400s(app: Any) -> float:
    return float(app[METRICS].requests.labels(endpoint="completions", status="400").value)


async def ordinary_request(url: str, connect: Any) -> int:
    """Another client's request, on its own connection: it must be served meanwhile."""
    c: Client = await connect(url)
    await c.send(post())
    status, _, _ = await c.response()
    return status


async def flood_one(url: str, app: Any, connect: Any, payload: bytes, **pace: Any
                    ) -> tuple[int, int]:
    """Flood one connection until stalled; check another client is served; close it.
    Returns (bytes accepted, RSS growth)."""
    rss = rss_bytes()
    sock = await flood_socket(url)
    try:
        accepted = await send_until_stalled(sock, payload, **pace)
        grown = rss_bytes() - rss
        assert await ordinary_request(url, connect) == 200
    finally:
        sock.close()
    return accepted, grown


@pytest.mark.parametrize("pace", [{}, {"piece": 1 << 16, "pace_s": 0.001}],
                         ids=["burst", "paced"])
async def test_flood_that_is_never_read_is_held_back(pair, start_pdlb, connect, pace) -> None:
    """The 16 MB burst (and the same bytes paced, 64 KiB a millisecond): the sender is
    blocked long before it is all accepted, on both fronts; pdlb's memory does not grow
    with it; another client is served meanwhile; the front accepts no more than about what
    aiohttp's server accepts (kernel buffers, which both share, are most of it)."""
    pu, du = pair
    accepted: dict[bool, int] = {}
    for fast_front in (False, True):
        url, app = await start_pdlb(make_config([pu], [du], server={
            "port": 0, "fast_front": fast_front}))
        accepted[fast_front], grown = await flood_one(url, app, connect, BURST, **pace)
        assert accepted[fast_front] < len(BURST) // 2, (fast_front, accepted)
        assert grown < 16 << 20, f"RSS grew by {grown >> 20} MiB (fast_front={fast_front})"
    assert accepted[True] <= 2 * accepted[False] + (4 << 20), accepted


async def test_held_pipeline_is_answered_in_order_once_read(pair, start_pdlb,
                                                            connect) -> None:
    """20,000 pipelined requests and one ordinary one behind them, the client not reading:
    the front stops serving once its answers back up (it does not answer into a void), and
    when the client reads, every request is answered, in order, by the front itself."""
    pu, du = pair
    url, app = await start_pdlb(make_config([pu], [du]))
    n = 20_000
    sock = await flood_socket(url)
    reader, writer = await asyncio.open_connection(sock=sock)
    c = Client(reader, writer)
    try:
        tail = post(extra="X-Request-Id: last\r\n")
        writer.write(ONE * n + tail)
        served = -1.0
        while served != (now := await served_400s(app)):  # until serving stops
            served = now
            await asyncio.sleep(0.5)
        assert served < n, "answers were written while the client was not reading"
        for i in range(n):
            status, headers, _ = await c.response()
            assert status == 400 and "server" not in headers, (i, status, headers)
        status, headers, _ = await c.response()
        assert status == 200 and headers["x-request-id"] == "last"
        assert "server" not in headers
        await bounded(writer.drain())
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
