"""Adversarial tests of pdlb's own HTTP/1.1 front (lb/serve/front.py), over raw sockets.

Each test pins one behaviour a client, a proxy in front of pdlb or an operator relies on:
message framing (smuggling), pipelining order, keep-alive and ``Connection: close``, the
hand-off of unusual bytes to aiohttp, a client that leaves mid-request, a client that reads
slowly, graceful shutdown, and answers that match aiohttp's path. Everything runs on
127.0.0.1 ephemeral ports against the fake backends, every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import orjson
import pytest
from aiohttp import web

from lb.serve.app import METRICS, PROXY
from lb.serve.server import start_site
from tests.conftest import counters, make_config, wait_idle
from tests.fake_vllm import FakeBehaviour, make_fake, run_app
from tests.rawhttp import STREAM_BODY, bounded, post
from tests.test_proxy_edges import sse_events

T = TypeVar("T")


@pytest.fixture
async def pair() -> AsyncIterator[tuple[FakeBehaviour, FakeBehaviour, str, str]]:
    """A fake prefill and a fake decode (as in test_proxy_edges.py)."""
    p, d = FakeBehaviour(), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        yield p, d, pu, du

@contextlib.asynccontextmanager
async def pdlb_with_runner(config: Any, drain_s: float) -> AsyncIterator[tuple[str, Any]]:
    """pdlb whose shutdown the test drives itself (runner.cleanup()); counters checked."""
    runner, url = await start_site(config, drain_s=drain_s)
    try:
        yield url, runner
    finally:
        with contextlib.suppress(Exception):
            await bounded(runner.cleanup(), 30)
    leftover = {k: v for k, v in counters(runner.app).items() if v}
    assert not leftover, f"in-flight counters not back to zero: {leftover}"


# ------------------------------------------------------------------ framing and smuggling
async def test_content_length_and_transfer_encoding_never_smuggle(pair, start_pdlb,
                                                                  connect) -> None:
    """CL + TE together (the classic smuggling pair): the front must not trust the length;
    aiohttp rejects the message, and the bytes hidden in the "body" never reach a backend
    as a request of their own."""
    _, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    c = await connect(url)
    hidden = post(extra="X-Request-Id: smuggled\r\n")
    chunked = b"0\r\n\r\n" + hidden
    raw = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n%b" % (len(chunked),
                                                                            chunked))
    await c.send(raw)
    status, _, _ = await c.response()
    assert status == 400
    await asyncio.sleep(0.2)
    assert all(r["headers"].get("x-request-id") != "smuggled" for r in d.requests)


async def test_giant_content_length_is_answered_not_dropped(pair, start_pdlb, connect) -> None:
    """A Content-Length of thousands of digits (int() refuses over 4300): the client gets
    an HTTP error answer like any other malformed length, not a silently dropped
    connection (an exception escaping data_received)."""
    _, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    c = await connect(url)
    await c.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                 + b"9" * 5000 + b"\r\n\r\n{}")
    status, _, _ = await c.response()
    assert 400 <= status < 500
    assert not d.requests


async def test_giant_content_length_pipelined_behind_a_request(pair, start_pdlb,
                                                               connect) -> None:
    """The same head pipelined behind a served request is parsed in the request task's
    ``finally``; the client still gets the first answer and then an error, promptly."""
    _, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    c = await connect(url)
    await c.send(post() + b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                 + b"7" * 5000 + b"\r\n\r\n{}")
    assert (await c.response())[0] == 200
    status, _, _ = await c.response()
    assert 400 <= status < 500
    assert len(d.requests) == 1


async def test_repeated_connection_header_close_wins(pair, start_pdlb, connect) -> None:
    """``Connection: close`` then ``Connection: keep-alive``: close was asked for; a later
    header must not cancel it (aiohttp's parser closes too). The pipelined second request
    is never served."""
    _, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    c = await connect(url)
    await c.send(post(extra="Connection: close\r\nConnection: keep-alive\r\n")
                 + post(extra="X-Request-Id: second\r\n"))
    status, headers, _ = await c.response()
    assert status == 200 and headers.get("connection") == "close"
    assert await c.closed_by_server()
    assert len(d.requests) == 1


async def test_connection_close_drops_pipelined_followers(pair, start_pdlb, connect) -> None:
    _, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    c = await connect(url)
    await c.send(post(extra="Connection: keep-alive, Close\r\n") + post() + post())
    status, headers, _ = await c.response()
    assert status == 200 and headers["connection"] == "close"
    assert await c.closed_by_server()
    assert len(d.requests) == 1


async def test_head_split_at_every_point_is_served(pair, start_pdlb, connect) -> None:
    """The head cut inside its final CRLFCRLF (or anywhere): whoever serves it, the answer
    is a 200 with the decode's text, and exactly one request reaches the decode."""
    _, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    raw = post()
    end = raw.index(b"\r\n\r\n")
    for cut in (5, end + 1, end + 2, end + 3, end + 4, len(raw) - 1):
        c = await connect(url)
        await c.send(raw[:cut])
        await asyncio.sleep(0.05)
        await c.send(raw[cut:])
        status, _, body = await c.response()
        assert status == 200, (cut, body)
        assert orjson.loads(body)["choices"][0]["text"] == "t0 t1 t2"
    assert len(d.requests) == 6


async def test_pipelined_answers_stay_in_order_with_errors_between(pair, start_pdlb,
                                                                   connect) -> None:
    """Good, bad JSON, wrong type, streamed, good: five answers in request order, all on
    one connection, in one write."""
    _, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    c = await connect(url)
    await c.send(post(extra="X-Request-Id: a\r\n") + post(body=b"{nope")
                 + post(extra="X-Request-Id: c\r\n").replace(b"application/json",
                                                             b"text/plain")
                 + post(body=STREAM_BODY, extra="X-Request-Id: d\r\n")
                 + post(extra="X-Request-Id: e\r\n"))
    answers = [await c.response() for _ in range(5)]
    assert [a[0] for a in answers] == [200, 400, 415, 200, 200]
    assert answers[0][1]["x-request-id"] == "a"
    assert sse_events(answers[3][2])[-1] == "[DONE]" and answers[3][1]["x-request-id"] == "d"
    assert answers[4][1]["x-request-id"] == "e"
    assert len(d.requests) == 3


async def test_pipelined_request_with_late_body(pair, start_pdlb, connect) -> None:
    """A second request whose body is still arriving when the first answer is done: the
    front waits for it and answers it on the same connection."""
    _, _, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    c = await connect(url)
    second = post(extra="X-Request-Id: late\r\n")
    await c.send(post() + second[:-7])
    assert (await c.response())[0] == 200
    await asyncio.sleep(0.1)
    await c.send(second[-7:])
    status, headers, _ = await c.response()
    assert status == 200 and headers["x-request-id"] == "late"


async def test_handed_off_connection_keeps_answering_in_order(pair, start_pdlb,
                                                              connect) -> None:
    """An HTTP/1.0 keep-alive request goes to aiohttp with the pipelined bytes behind it;
    aiohttp answers both in order."""
    _, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    c = await connect(url)
    await c.send(post(version="HTTP/1.0", extra="Connection: keep-alive\r\n"
                      "X-Request-Id: ten\r\n") + post(extra="X-Request-Id: eleven\r\n"))
    status, headers, _ = await c.response()
    assert status == 200 and headers["x-request-id"] == "ten"
    status, headers, _ = await c.response()
    assert status == 200 and headers["x-request-id"] == "eleven"
    assert "aiohttp" in headers["server"]
    assert len(d.requests) == 2


async def test_repeated_header_first_value_on_both_servers(pair, start_pdlb, connect) -> None:
    """A repeated header means the same on both servers: ClientSide.headers documents the
    first value. The X-Request-Id echoed (and sent to the backends) must not depend on
    whether the front or aiohttp parsed the request."""
    p, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    twice = "X-Request-Id: first\r\nX-Request-Id: second\r\n"
    c = await connect(url)
    await c.send(post(extra=twice))
    _, front_headers, _ = await c.response()
    c = await connect(url)
    await c.send(post(extra=twice + "Expect: 100-continue\r\n"))  # aiohttp's path
    status, aio_headers, _ = await c.response()
    if status == 100:
        status, aio_headers, _ = await c.response()
    assert "aiohttp" in aio_headers["server"] and "server" not in front_headers
    assert front_headers["x-request-id"] == aio_headers["x-request-id"] == "first"
    assert [r["headers"]["x-request-id"] for r in d.requests] == ["first", "first"]


async def test_forwarded_authorization_is_the_checked_one(pair, start_pdlb, connect) -> None:
    """With ``forward_client_authorization``, the key pdlb checked is the one forwarded,
    on both servers: two Authorization headers must not let a client authenticate with
    one and send the backends another."""
    p, _, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du], auth={
        "api_keys": ["good"], "forward_client_authorization": True}))
    two = "Authorization: Bearer good\r\nAuthorization: Bearer other\r\n"
    for extra in ("", "Expect: 100-continue\r\n"):
        c = await connect(url)
        await c.send(post(extra=two + extra))
        status, _, _ = await c.response()
        if status == 100:
            status, _, _ = await c.response()
        assert status == 200
    assert [r["headers"]["authorization"] for r in p.requests] == ["Bearer good"] * 2


# ------------------------------------------------------------------ errors look the same
@pytest.mark.parametrize("case", ["bad_json", "media_type", "no_key", "max_tokens"])
async def test_errors_match_aiohttp_path(pair, start_pdlb, connect, case) -> None:
    """The same bad request on the front and on aiohttp (forced by Expect): same status,
    same JSON error body, same connection fate."""
    _, _, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du], auth={"api_keys": ["k"]},
                                          server={"port": 0, "max_tokens_limit": 5}))
    key = "Authorization: Bearer k\r\n"
    if case == "bad_json":
        raw = post(body=b"[1,", extra=key)
    elif case == "media_type":
        raw = post(extra=key).replace(b"application/json", b"text/html")
    elif case == "no_key":
        raw = post()
    else:
        raw = post(body=orjson.dumps({"prompt": "x", "max_tokens": 50}), extra=key)
    answers = []
    for expect in (b"", b"Expect: 100-continue\r\n"):
        c = await connect(url)
        await c.send(raw.replace(b"Host: x\r\n", b"Host: x\r\n" + expect))
        status, headers, body = await c.response()
        if status == 100:
            status, headers, body = await c.response()
        await c.send(post(extra=key))  # the connection stays usable after a 4xx
        assert (await c.response())[0] == 200
        answers.append((status, headers["content-type"].split(";")[0], orjson.loads(body)))
    assert answers[0] == answers[1]


# ------------------------------------------------------------------ client leaving
async def test_reset_during_prefill_cancels_both_legs(pair, start_pdlb, connect) -> None:
    """A client that resets mid-prefill: the request is cancelled at once (the prefill leg
    aborted, the decode never called) and every counter returns to zero."""
    p, d, pu, du = pair
    p.delay_s = 5.0
    url, app = await start_pdlb(make_config([pu], [du]))
    c = await connect(url)
    await c.send(post())
    for _ in range(100):
        if p.requests:
            break
        await asyncio.sleep(0.02)
    assert p.requests and app[PROXY].active_requests == 1
    c.reset()
    for _ in range(100):
        if not app[PROXY].active_requests:
            break
        await asyncio.sleep(0.02)
    assert app[PROXY].active_requests == 0, "the request outlived its client"
    assert not any((await wait_idle(app, 2)).values())
    assert not d.requests


async def test_disconnect_mid_stream_with_pipelined_bytes(pair, start_pdlb, connect) -> None:
    """The client leaves during a stream with another request queued behind it: the decode
    is aborted and the queued request never reaches a backend."""
    _, d, pu, du = pair
    d.chunk_delay_s = 0.1
    url, app = await start_pdlb(make_config([pu], [du]))
    c = await connect(url)
    body = orjson.dumps({"prompt": "x", "max_tokens": 50, "stream": True})
    await c.send(post(body=body) + post(extra="X-Request-Id: queued\r\n"))
    status, headers = await c.head()
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    await bounded(c.reader.readuntil(b"t1 "))
    c.writer.close()
    for _ in range(150):
        if d.aborted:
            break
        await asyncio.sleep(0.02)
    assert d.aborted == 1 and d.finished == 0
    assert app[PROXY].active_requests == 0
    assert len(d.requests) == 1


async def test_half_close_after_request_is_like_aiohttp(pair, start_pdlb, connect) -> None:
    """A client that shuts its write side after the request (``nc -N``): aiohttp closes
    such a connection and cancels the handler; the front must at least free everything
    (no request left running, counters at zero)."""
    p, _, pu, du = pair
    p.delay_s = 0.5
    url, app = await start_pdlb(make_config([pu], [du]))
    c = await connect(url)
    await c.send(post())
    c.writer.write_eof()
    assert await c.closed_by_server()
    await asyncio.sleep(0.1)
    assert app[PROXY].active_requests == 0


# ------------------------------------------------------------------ slow readers
@pytest.fixture
async def big_stream() -> AsyncIterator[tuple[dict[str, int], str]]:
    """A decode that streams 400 events of 16 KiB (about 6.5 MB), counting what it wrote."""
    state = {"written": 0, "finished": 0, "aborted": 0}

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(400):
                event = {"choices": [{"index": 0, "text": f"{i:05d}" + "x" * 16384}]}
                await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
                state["written"] += 1
            await resp.write(b"data: [DONE]\n\n")
            state["finished"] += 1
        except (asyncio.CancelledError, ConnectionResetError):
            state["aborted"] += 1
            raise
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    async with run_app(app) as url:
        yield state, url


async def test_slow_reader_gets_the_whole_stream_in_order(big_stream, start_pdlb,
                                                          connect) -> None:
    """A client with a tiny receive window that stops reading for a while: the stream
    pauses instead of failing, and every event arrives once, in order, then [DONE]."""
    state, du = big_stream
    async with run_app(make_fake("prefill", FakeBehaviour())) as pu:
        url, _ = await start_pdlb(make_config([pu], [du]))
        c = await connect(url, rcvbuf=8192)
        await c.send(post(body=STREAM_BODY))
        status, _ = await c.head()
        assert status == 200
        await asyncio.sleep(1.0)  # not reading: the front must wait, not give up
        chunks = b""
        while True:
            size = int((await bounded(c.reader.readuntil(b"\r\n")))[:-2], 16)
            data = await bounded(c.reader.readexactly(size + 2))
            if size == 0:
                break
            chunks += data[:-2]
        events = sse_events(chunks)
        assert events[-1] == "[DONE]"
        assert [e["choices"][0]["text"][:5] for e in events[:-1]] == [
            f"{i:05d}" for i in range(400)]
        assert state["finished"] == 1


async def test_slow_reader_that_leaves_aborts_the_decode(big_stream, start_pdlb,
                                                         connect) -> None:
    """A client that stops reading with the stream paused on it, then resets: the decode
    is aborted and the request freed (not stuck waiting for a drain that never comes)."""
    state, du = big_stream
    async with run_app(make_fake("prefill", FakeBehaviour())) as pu:
        url, app = await start_pdlb(make_config([pu], [du]))
        c = await connect(url, rcvbuf=8192)
        await c.send(post(body=STREAM_BODY))
        assert (await c.head())[0] == 200
        await asyncio.sleep(0.5)
        c.reset()
        for _ in range(150):
            if not app[PROXY].active_requests:
                break
            await asyncio.sleep(0.02)
        assert app[PROXY].active_requests == 0


async def test_client_that_never_reads_does_not_pin_the_request(big_stream, start_pdlb,
                                                                connect) -> None:
    """A client that stays connected but stops reading: once the stream has stalled for
    idle_s, pdlb tries to end it with an error event, gives that up after idle_s more, and
    frees the request (lease, ticket) instead of waiting on the client for ever."""
    state, du = big_stream
    async with run_app(make_fake("prefill", FakeBehaviour())) as pu:
        url, app = await start_pdlb(make_config(
            [pu], [du], server={"port": 0, "timeouts": {"idle_s": 0.5}}))
        c = await connect(url, rcvbuf=8192)
        await c.send(post(body=STREAM_BODY))
        assert (await c.head())[0] == 200
        for _ in range(300):
            if not app[PROXY].active_requests:
                break
            await asyncio.sleep(0.02)
        assert app[PROXY].active_requests == 0
        given_up = app[METRICS].client_disconnects.labels(phase="not_reading").value
        assert given_up == 1  # freed because pdlb gave up on the client, not by finishing


# ------------------------------------------------------------------ graceful shutdown
async def test_shutdown_lets_in_flight_finish_and_closes_idle(pair, connect) -> None:
    """runner.cleanup(): an idle keep-alive connection is closed at once; a request in
    flight finishes (within drain_s), then its connection closes."""
    _, d, pu, du = pair
    d.delay_s = 0.5
    async with pdlb_with_runner(make_config([pu], [du]), drain_s=5.0) as (url, runner):
        idle = await connect(url)
        await idle.send(post())
        d.delay_s, first = 0.0, await idle.response()
        assert first[0] == 200
        d.delay_s = 0.5
        busy = await connect(url)
        await busy.send(post(extra="X-Request-Id: busy\r\n"))
        await asyncio.sleep(0.1)
        cleanup = asyncio.create_task(runner.cleanup())
        assert await idle.closed_by_server(1.0)
        status, headers, _ = await busy.response()
        assert status == 200 and headers["x-request-id"] == "busy"
        assert await busy.closed_by_server()
        await bounded(cleanup, 10)


async def test_shutdown_serves_a_request_whose_body_is_arriving(pair, connect) -> None:
    """A request whose head is in and whose body is still coming when shutdown starts is
    in flight, not idle: as on aiohttp, it is served (within drain_s), not dropped."""
    _, d, pu, du = pair
    async with pdlb_with_runner(make_config([pu], [du]), drain_s=5.0) as (url, runner):
        c = await connect(url)
        raw = post(extra="X-Request-Id: uploading\r\n")
        await c.send(raw[:-6])
        await asyncio.sleep(0.1)
        cleanup = asyncio.create_task(runner.cleanup())
        await asyncio.sleep(0.2)
        assert not cleanup.done()
        await c.send(raw[-6:])
        status, headers, _ = await c.response()
        assert status == 200 and headers["x-request-id"] == "uploading"
        assert headers.get("connection") == "close"
        assert await c.closed_by_server()
        await bounded(cleanup, 10)
        assert len(d.requests) == 1


async def test_shutdown_cancels_what_outlives_drain(pair, connect) -> None:
    """A request slower than drain_s is cancelled at the deadline: its connection closes,
    cleanup returns soon after drain_s and the counters are zero (checked on exit)."""
    p, _, pu, du = pair
    p.delay_s = 10.0
    async with pdlb_with_runner(make_config([pu], [du]), drain_s=0.5) as (url, runner):
        c = await connect(url)
        await c.send(post())
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await bounded(runner.cleanup(), 5)
        assert loop.time() - start < 3.0
        assert await c.closed_by_server()


async def test_shutdown_closes_idle_aiohttp_connections_too(pair, connect) -> None:
    """While the front drains, an idle keep-alive connection that aiohttp owns (handed
    off earlier) must not take new requests: it is closed at once, like the front's."""
    _, d, pu, du = pair
    async with pdlb_with_runner(make_config([pu], [du]), drain_s=5.0) as (url, runner):
        handed = await connect(url)
        await handed.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = await handed.response()
        assert status == 200 and "aiohttp" in headers["server"]
        d.delay_s = 1.0
        busy = await connect(url)
        await busy.send(post())
        await asyncio.sleep(0.1)
        cleanup = asyncio.create_task(runner.cleanup())
        assert await handed.closed_by_server(0.5)
        assert (await busy.response())[0] == 200
        await bounded(cleanup, 10)


async def test_shutdown_drains_both_servers_on_one_deadline(pair, connect) -> None:
    """A front request and a handed-off (HTTP/1.0) one, both slower than drain_s: the two
    drains run side by side, so cleanup takes what aiohttp's alone takes (it waits
    drain_s for the handler, then up to drain_s more after cancelling it: 2 s here), not
    the front's drain followed by aiohttp's (3 s)."""
    p, _, pu, du = pair
    p.delay_s = 10.0
    async with pdlb_with_runner(make_config([pu], [du]), drain_s=1.0) as (url, runner):
        front = await connect(url)
        await front.send(post())
        handed = await connect(url)
        await handed.send(post(version="HTTP/1.0"))
        for _ in range(100):
            if len(p.requests) == 2:
                break
            await asyncio.sleep(0.02)
        assert len(p.requests) == 2
        loop = asyncio.get_running_loop()
        start = loop.time()
        await bounded(runner.cleanup(), 10)
        took = loop.time() - start
        assert took < 2.5, f"cleanup took {took:.2f} s with drain_s = 1"
        assert await front.closed_by_server(1.0)
        assert await handed.closed_by_server(1.0)


async def test_shutdown_closes_a_body_that_never_comes(pair, connect) -> None:
    """A request whose body stops arriving during the drain: closed at the deadline,
    nothing reaches a backend, cleanup does not wait for the body timeout."""
    _, d, pu, du = pair
    cfg = make_config([pu], [du], server={"port": 0, "body_timeout_s": 30})
    async with pdlb_with_runner(cfg, drain_s=0.5) as (url, runner):
        c = await connect(url)
        await c.send(post()[:-3])
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await bounded(runner.cleanup(), 10)
        assert loop.time() - start < 2.0
        assert await c.closed_by_server(1.0)
        assert not d.requests
