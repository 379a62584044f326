"""pdlb's own HTTP/1.1 front (lb/serve/front.py, ``[server] fast_front``).

The proxy test files run through the front (the default); this module tests what only the
front has — its head parser, keep-alive and pipelining, bodies that arrive late or never,
the hand-off of everything unusual to aiohttp — over raw sockets, and re-runs the proxy
test files with ``fast_front = false`` so aiohttp's server path stays covered.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

import lb.config
import lb.serve.front
from lb.serve.front import FrontProtocol
from lb.serve.requesthead import parse_head
from tests.conftest import make_config
from tests.rawhttp import BODY, STREAM_BODY, post

# ------------------------------------------------------------------ aiohttp's server, again
from tests.test_faults import *  # noqa: F403  (collected again, fast_front off)
from tests.test_proxy_edges import *  # noqa: F403
from tests.test_proxy_edges import sse_events


@pytest.fixture(autouse=True)
def _aiohttp_server_for_reimported_tests(request: pytest.FixtureRequest,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests imported from other modules run here with every request on aiohttp's server."""
    if request.function.__module__ != __name__:
        monkeypatch.setattr(lb.config, "FAST_FRONT_DEFAULT", False)

        def forbidden(self: FrontProtocol, *args: Any) -> None:
            raise AssertionError("the front was used with fast_front = false")

        monkeypatch.setattr(FrontProtocol, "connection_made", forbidden)


# ------------------------------------------------------------------ the head parser
def test_parse_head_serves_only_the_common_case() -> None:
    head = parse_head(post(extra="X-Request-Id: r1\r\nConnection: close\r\n"), 1 << 20)
    assert head is not None and head.endpoint == "completions" and head.close
    assert head.headers["x-request-id"] == "r1"
    assert head.headers["content-type"] == "application/json"
    chat = parse_head(post("/v1/chat/completions"), 1 << 20)
    assert chat is not None and chat.endpoint == "chat" and not chat.close
    for raw in (
        post("/v1/models"),                                     # another route
        post("/v1/completions?x=1"),                            # a query string
        post(version="HTTP/1.0"),
        post(extra="Transfer-Encoding: chunked\r\n"),
        post(extra="Expect: 100-continue\r\n"),
        post(extra="Connection: Upgrade\r\nUpgrade: h2c\r\n"),
        post(extra="Bad Name: x\r\n"),                          # not a token
        post(extra="X: a\x01b\r\n"),                            # control character
        post(extra="Content-Length: 5\r\n"),                    # two lengths
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n",    # no length
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n",  # not ASCII digits
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 9",  # head not whole
        post(body=b"x" * 2000),                                 # over max_body (1000 below)
    ):
        assert parse_head(raw, 1000) is None, raw


# ------------------------------------------------------------------ served by the front
async def test_keep_alive_and_pipelining(pair, start_pdlb, connect) -> None:
    """Three requests on one connection, two of them pipelined in one write; answers come
    in order and the connection stays open. The front answers without aiohttp's Server
    header, which tells the two servers apart."""
    _, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    c = await connect(url)
    await c.send(post(extra="X-Request-Id: one\r\n"))
    status, headers, body = await c.response()
    assert status == 200 and headers["x-request-id"] == "one" and "server" not in headers
    assert orjson.loads(body)["choices"][0]["text"] == "t0 t1 t2"
    await c.send(post(body=STREAM_BODY, extra="X-Request-Id: two\r\n")
                 + post(extra="X-Request-Id: three\r\n"))
    status, headers, body = await c.response()
    assert status == 200 and headers["x-request-id"] == "two"
    assert headers["content-type"] == "text/event-stream"
    assert sse_events(body)[-1] == "[DONE]"
    status, headers, body = await c.response()
    assert status == 200 and headers["x-request-id"] == "three"
    assert len(d.requests) == 3


async def test_pipelined_other_route_is_handed_to_aiohttp(pair, start_pdlb, connect) -> None:
    """A completion, then GET /health on the same connection: the front answers the first
    and hands the connection (with the bytes it holds) to aiohttp for the rest."""
    _, _, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    c = await connect(url)
    await c.send(post() + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                 + post(extra="X-Request-Id: after\r\n"))
    status, headers, _ = await c.response()
    assert status == 200 and "server" not in headers
    status, headers, body = await c.response()
    assert status == 200 and "aiohttp" in headers["server"]
    status, headers, _ = await c.response()
    assert status == 200 and headers["x-request-id"] == "after" and "aiohttp" in headers["server"]


async def test_body_arriving_after_the_head(pair, start_pdlb, connect) -> None:
    _, _, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    c = await connect(url)
    raw = post()
    await c.send(raw[:-10])
    await asyncio.sleep(0.1)
    await c.send(raw[-10:])
    status, headers, _ = await c.response()
    assert status == 200 and "server" not in headers


async def test_body_that_never_arrives_is_408(pair, start_pdlb, connect) -> None:
    _, d, pu, du = pair
    url, app = await start_pdlb(make_config([pu], [du], server={"port": 0,
                                                               "body_timeout_s": 0.3}))
    c = await connect(url)
    await c.send(post()[:-5])
    status, headers, body = await c.response()
    assert status == 408 and headers["connection"] == "close"
    assert orjson.loads(body)["error"]["code"] == "body_timeout"
    assert await c.closed_by_server()
    assert not d.requests


async def test_connection_close_is_honoured(pair, start_pdlb, connect) -> None:
    _, _, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    c = await connect(url)
    await c.send(post(body=STREAM_BODY, extra="Connection: close\r\n"))
    status, headers, body = await c.response()
    assert status == 200 and headers["connection"] == "close"
    assert sse_events(body)[-1] == "[DONE]"
    assert await c.closed_by_server()


async def test_idle_connection_is_closed(pair, start_pdlb, connect) -> None:
    _, _, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du], server={"port": 0,
                                                             "client_idle_timeout_s": 0.3}))
    c = await connect(url)
    await c.send(post())
    assert (await c.response())[0] == 200
    assert await c.closed_by_server()


async def test_errors_are_openai_shaped(pair, start_pdlb, connect) -> None:
    """Bad JSON, a wrong Content-Type, a missing API key: the same answers as aiohttp's path,
    and the connection stays usable."""
    _, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du], auth={"api_keys": ["k1"]}))
    c = await connect(url)
    key = "Authorization: Bearer k1\r\n"
    await c.send(post(body=b"{not json", extra=key))
    status, _, body = await c.response()
    assert status == 400 and orjson.loads(body)["error"]["code"] == "invalid_json"
    await c.send(post(extra=key).replace(b"application/json", b"text/plain"))
    status, _, body = await c.response()
    assert status == 415 and orjson.loads(body)["error"]["code"] == "unsupported_media_type"
    await c.send(post(extra="Authorization: Bearer wrong\r\n"))
    status, _, body = await c.response()
    assert status == 401 and orjson.loads(body)["error"]["code"] == "invalid_api_key"
    await c.send(post(extra=key))
    assert (await c.response())[0] == 200
    assert len(d.requests) == 1


# ------------------------------------------------------------------ handed to aiohttp
@pytest.mark.parametrize("case", ["chunked", "expect", "http10", "bad_header", "too_large"])
async def test_unusual_requests_go_to_aiohttp(pair, start_pdlb, connect, case) -> None:
    _, _, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du], server={"port": 0,
                                                             "max_body_bytes": 4096}))
    c = await connect(url)
    if case == "chunked":
        raw = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(BODY), BODY))
    elif case == "expect":
        raw = post(extra="Expect: 100-continue\r\n")
    elif case == "http10":
        raw = post(version="HTTP/1.0")
    elif case == "bad_header":
        raw = post(extra="Bad Name: x\r\n")
    else:
        raw = post(body=b"x" * 5000)
    await c.send(raw)
    status, headers, body = await c.response()
    if case == "expect" and status == 100:
        status, headers, body = await c.response()
    expected = {"bad_header": 400, "too_large": 413}.get(case, 200)
    assert status == expected, body
    if status == 200:
        assert orjson.loads(body)["choices"][0]["text"] == "t0 t1 t2"
    if case == "too_large":
        assert orjson.loads(body)["error"]["code"] == "body_too_large"



async def test_large_body_in_pieces_is_read_by_aiohttp(pair, start_pdlb, connect,
                                                       monkeypatch) -> None:
    """A body over BODY_WAIT_LIMIT (1 MiB; 20 kB here, the fake backend takes 1 MiB at most)
    that does not come with its head: the connection goes to aiohttp with everything read
    so far, and the request is served whole."""
    monkeypatch.setattr(lb.serve.front, "BODY_WAIT_LIMIT", 20_000)
    p, _, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    c = await connect(url)
    prompt = "word " * 10_000
    raw = post(body=orjson.dumps({"prompt": prompt, "max_tokens": 2}))
    await c.send(raw[:30_000])
    await asyncio.sleep(0.1)
    await c.send(raw[30_000:])
    status, headers, body = await c.response()
    assert status == 200 and "aiohttp" in headers["server"], body[:200]
    assert p.requests[-1]["body"]["prompt"] == prompt


@pytest.mark.parametrize("fast_front", [True, False])
async def test_refused_key_is_counted_on_both_servers(pair, start_pdlb, connect,
                                                      fast_front) -> None:
    """A request refused for its API key shows in pdlb_requests, whichever server took it."""
    _, _, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du], auth={"api_keys": ["k1"]},
                                          server={"port": 0, "fast_front": fast_front}))
    c = await connect(url)
    await c.send(post(extra="Authorization: Bearer wrong\r\n"))
    status, headers, _ = await c.response()
    assert status == 401 and ("server" in headers) != fast_front
    await c.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, text = await c.response()
    assert status == 200
    assert b'pdlb_requests_total{endpoint="completions",status="401"} 1.0' in text


@pytest.mark.parametrize("fast_front", [True, False])
async def test_non_ascii_request_id_is_kept_byte_for_byte(pair, start_pdlb, connect,
                                                          fast_front) -> None:
    """A UTF-8 X-Request-Id is echoed to the client and forwarded to both legs unchanged,
    whichever server took the request; so is one with a byte that is not UTF-8 on the front
    (aiohttp drops such a byte from the echo, a quirk of its own)."""
    p, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du],
                                          server={"port": 0, "fast_front": fast_front}))
    c = await connect(url)
    for rid in ("req-é€".encode(), b"req-\xff")[:2 if fast_front else 1]:
        await c.send(post().replace(b"Host: x\r\n", b"Host: x\r\nX-Request-Id: " + rid + b"\r\n"))
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 10)
        assert b"\r\nX-Request-Id: " + rid + b"\r\n" in head, head
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        await c.reader.readexactly(length)
        sent = rid.decode("utf-8", "surrogateescape")
        assert p.requests[-1]["headers"]["x-request-id"] == sent
        assert d.requests[-1]["headers"]["x-request-id"] == sent


@pytest.mark.parametrize("fast_front", [True, False])
async def test_idle_deadline_holds_across_a_hand_off(pair, start_pdlb, connect,
                                                     fast_front) -> None:
    """client_idle_timeout_s bounds a connection stuck in an incomplete head even when
    the front hands it to aiohttp (whose keep-alive timer starts afresh): A connects, waits
    0.8 of the timeout, sends half a head (not a request the front can read: handed off);
    B connects at 0.5 of it and sends nothing. A must be closed first (at 1.0; the timer
    restarted would close it at 1.8, after B's 1.5) — an order, not a measured time."""
    _, _, pu, du = pair
    idle = 1.0
    url, _ = await start_pdlb(make_config([pu], [du], server={
        "port": 0, "client_idle_timeout_s": idle, "fast_front": fast_front}))
    a = await connect(url)
    await asyncio.sleep(0.5 * idle)
    b = await connect(url)
    await asyncio.sleep(0.3 * idle)
    await a.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Half: ")
    a_closed = asyncio.create_task(a.closed_by_server(3 * idle))
    b_closed = asyncio.create_task(b.closed_by_server(3 * idle))
    done, _ = await asyncio.wait([a_closed, b_closed], return_when=asyncio.FIRST_COMPLETED)
    assert a_closed in done and b_closed not in done
    assert a_closed.result() and await b_closed
