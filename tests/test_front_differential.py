"""Differential tests: the same raw bytes to both fronts must give the same result.

For each case of the table, one connection to pdlb with ``fast_front = true`` (pdlb's own
front, which hands anything unusual to aiohttp) and one to pdlb with ``fast_front = false``
(aiohttp's server throughout) get the same bytes. Compared: every answer on the connection
(status, the headers a client acts on, the JSON or SSE body), the bytes each backend
received (path, headers but Host, body), and what the connection does next (a follow-up
request answered, or the connection closed). Both pdlbs sit in front of the same recording
fake backends. ``front`` in a case says the fast front must answer it itself, so that the
table really compares two servers and not aiohttp with itself.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import make_config
from tests.fake_vllm import FakeBehaviour, make_fake, run_app
from tests.rawhttp import BODY, STREAM_BODY, Client, post
from tests.test_proxy_edges import sse_events

KEY = "Authorization: Bearer k\r\n"
COMPARED_HEADERS = ("content-type", "x-request-id", "connection", "retry-after",
                    "accept-encoding", "transfer-encoding", "cache-control")


@dataclass(frozen=True)
class Case:
    raw: bytes | tuple[bytes, ...]
    """The bytes, or pieces sent 50 ms apart."""
    answers: int
    front: bool = False
    """The fast front answers it itself (else it hands the connection to aiohttp)."""
    server: dict[str, Any] = field(default_factory=dict)
    pause_s: float = 0.0
    """Wait this long before reading (a body that never comes)."""


def chunked(body: bytes) -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + KEY.encode() + b"X-Request-Id: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))


CASES: dict[str, Case] = {
    "normal": Case(post(extra=KEY + "X-Request-Id: n1\r\n"), 1, front=True),
    "chat": Case(post("/v1/chat/completions", orjson.dumps(
        {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        extra=KEY + "X-Request-Id: c1\r\n"), 1, front=True),
    "stream": Case(post(body=STREAM_BODY, extra=KEY + "X-Request-Id: s1\r\n"), 1, front=True),
    "pipelined_two": Case(post(extra=KEY + "X-Request-Id: p1\r\n")
                          + post(body=STREAM_BODY, extra=KEY + "X-Request-Id: p2\r\n"), 2,
                          front=True),
    "bad_json": Case(post(body=b"{nope", extra=KEY), 1, front=True),
    "not_an_object": Case(post(body=b"[1, 2]", extra=KEY), 1, front=True),
    "missing_prompt": Case(post(body=b'{"model": "fake"}', extra=KEY), 1, front=True),
    "wrong_content_type": Case(post(extra=KEY).replace(b"application/json", b"text/plain"), 1,
                               front=True),
    "bad_auth": Case(post(extra="Authorization: Bearer wrong\r\n"), 1, front=True),
    "no_auth": Case(post(), 1, front=True),
    "content_encoding": Case(post(body=gzip.compress(BODY),
                                  extra=KEY + "Content-Encoding: gzip\r\n"), 1, front=True),
    "max_tokens_limit": Case(post(body=orjson.dumps({"prompt": "x", "max_tokens": 50}),
                                  extra=KEY), 1, front=True, server={"max_tokens_limit": 5}),
    "oversize_body": Case(post(body=b"x" * 5000, extra=KEY), 1,
                          server={"max_body_bytes": 4096}),
    "connection_close": Case(post(extra=KEY + "Connection: close\r\nX-Request-Id: cc\r\n"), 1,
                             front=True),
    "http10": Case(post(version="HTTP/1.0", extra=KEY + "X-Request-Id: ten\r\n"), 1),
    "http10_keep_alive": Case(post(version="HTTP/1.0",
                                   extra=KEY + "Connection: keep-alive\r\nX-Request-Id: k\r\n"),
                              1),
    "chunked_body": Case(chunked(BODY), 1),
    "expect_100": Case(post(extra=KEY + "Expect: 100-continue\r\nX-Request-Id: e\r\n"), 2),
    "missing_content_length": Case(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + KEY.encode() + b"\r\n", 1),
    "other_route": Case(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + KEY.encode() + b"\r\n",
                        1),
    "unknown_route": Case(post("/v1/nothing", extra=KEY), 1),
    "pipelined_error_between": Case(post(extra=KEY + "X-Request-Id: g1\r\n")
                                    + post(body=b"{nope", extra=KEY)
                                    + post(extra=KEY + "X-Request-Id: g3\r\n"), 3, front=True),
    "pipelined_other_route": Case(post(extra=KEY + "X-Request-Id: o1\r\n")
                                  + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 2),
    "split_head": Case((post(extra=KEY + "X-Request-Id: sp\r\n")[:30],
                        post(extra=KEY + "X-Request-Id: sp\r\n")[30:]), 1),
    "late_body": Case((post(extra=KEY + "X-Request-Id: lb\r\n")[:-9],
                       post(extra=KEY + "X-Request-Id: lb\r\n")[-9:]), 1, front=True),
    "repeated_request_id": Case(post(extra=KEY + "X-Request-Id: r1\r\nX-Request-Id: r2\r\n"),
                                1, front=True),
    "plus_content_length": Case(post(extra=KEY).replace(b"Content-Length: ",
                                                        b"Content-Length: +"), 1),
    "length_and_chunked": Case(post(extra=KEY + "Transfer-Encoding: chunked\r\n"), 1),
    "body_never_completes": Case(post(extra=KEY)[:-5], 1, front=True,
                                 server={"body_timeout_s": 0.3}, pause_s=0.5),
}


@dataclass
class Outcome:
    answers: list[tuple[int, dict[str, str], Any]]
    by_front: bool
    backend: list[tuple[str, str, dict[str, str], bytes]]
    next_request: str


@pytest.fixture
async def recording() -> AsyncIterator[tuple[str, str, list[Any]]]:
    """A fake prefill and decode that record every POST: role, path, headers, raw body."""
    seen: list[tuple[str, str, dict[str, str], bytes]] = []

    def recorder(role: str) -> Any:
        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.method == "POST":
                headers = {k.lower(): v for k, v in request.headers.items()
                           if k.lower() != "host"}
                seen.append((role, request.path, headers, await request.read()))
            return await handler(request)
        return record

    apps = {}
    for role in ("prefill", "decode"):
        apps[role] = make_fake(role, FakeBehaviour())
        apps[role].middlewares.append(recorder(role))
    async with run_app(apps["prefill"]) as pu, run_app(apps["decode"]) as du:
        yield pu, du, seen


def normalise(status: int, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str],
                                                                          Any]:
    kept = {name: headers[name] for name in COMPARED_HEADERS if name in headers}
    if headers.get("content-type", "").startswith("text/event-stream"):
        content: Any = sse_events(body)
    elif body:
        try:
            content = orjson.loads(body)
        except orjson.JSONDecodeError:
            content = body
    else:
        content = b""
    return status, kept, content


async def run_case(case: Case, url: str, connect: Any, seen: list[Any]) -> Outcome:
    seen.clear()
    c: Client = await connect(url)
    for i, piece in enumerate((case.raw,) if isinstance(case.raw, bytes) else case.raw):
        if i:
            await asyncio.sleep(0.05)
        await c.send(piece)
    if case.pause_s:
        await asyncio.sleep(case.pause_s)
    answers = []
    by_front = True
    for _ in range(case.answers):
        status, headers, body = await c.response()
        by_front = by_front and "server" not in headers  # aiohttp's carry its Server header
        answers.append(normalise(status, headers, body))
    try:
        await c.send(post(extra=KEY + "X-Request-Id: next\r\n"))
        status, headers, _ = await c.response()
        next_request = f"{status} {headers.get('x-request-id')}"
    except (ConnectionError, asyncio.IncompleteReadError):
        next_request = "closed"
    await asyncio.sleep(0.05)  # a backend's record of a request cancelled late
    return Outcome(answers, by_front, list(seen), next_request)


@pytest.mark.parametrize("name", list(CASES))
async def test_both_fronts_agree(recording, start_pdlb, connect, name) -> None:
    """One case of the table: the same answers, backend bytes and next-request fate."""
    pu, du, seen = recording
    case = CASES[name]
    outcomes = {}
    for fast_front in (True, False):
        url, _ = await start_pdlb(make_config([pu], [du], auth={"api_keys": ["k"]},
                                              server={"port": 0, "fast_front": fast_front,
                                                      **case.server}))
        outcomes[fast_front] = await run_case(case, url, connect, seen)
    fast, reference = outcomes[True], outcomes[False]
    assert not reference.by_front
    assert fast.by_front == case.front, "the case does not reach the server it is meant to"
    assert fast.answers == reference.answers
    assert fast.backend == reference.backend
    assert fast.next_request == reference.next_request
