"""The fast HTTP/1.1 transport and the SSE parser on real sockets with scripted answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from time import perf_counter

import orjson
import pytest

from loadgen.client import Sender, make_session, make_transport, request_headers
from loadgen.records import Record
from loadgen.sse import StreamState
from loadgen.transport import FastTransport, ProtocolError, _Exchange
from loadgen.workload import Item, Turn


def sse(*objs: object, done: bool = True) -> bytes:
    out = b"".join(b"data: " + orjson.dumps(o) + b"\n\n" for o in objs)
    return out + (b"data: [DONE]\n\n" if done else b"")


def tok(text: str, n: int | None = None, finish: str | None = None) -> dict[str, object]:
    obj: dict[str, object] = {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    if n is not None:
        obj["usage"] = {"prompt_tokens": 3, "completion_tokens": n}
    return obj


def chunked(body: bytes, size: int) -> bytes:
    parts = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


BODY = sse(tok("a", 1), tok("bc", 3), tok("", 3, "length"),
           {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}})


def parse_all(raw: bytes, split: int) -> StreamState:
    """Feed a whole HTTP answer to a fresh exchange in pieces of `split` bytes."""
    loop = asyncio.new_event_loop()
    try:
        state = StreamState(chat=False, t_send=0.0)
        ex = _Exchange(state.feed, loop.create_future())
        for i in range(0, len(raw), split):
            ex.feed(raw[i:i + split])
        assert ex.done.done(), "exchange did not complete"
        return state
    finally:
        loop.close()


@pytest.mark.parametrize("split", [1, 2, 3, 7, 64, 10_000])
@pytest.mark.parametrize("chunk", [1, 5, 40, 10_000])
def test_chunked_framing_any_boundaries(split: int, chunk: int) -> None:
    """Chunk sizes and read boundaries anywhere (even inside CRLFs) decode identically."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    st = parse_all(head + chunked(BODY, chunk), split)
    assert len(st.times) == 2            # "a" and "bc"; the empty finish chunk carries none
    assert list(st.tokens) == [1, 2]
    assert st.output_tokens == 3 and st.finished


def test_one_read_per_chunk_and_event() -> None:
    """The fast paths (a read = one whole chunk = one whole event) agree with the rest."""
    loop = asyncio.new_event_loop()
    try:
        state = StreamState(chat=False, t_send=0.0)
        ex = _Exchange(state.feed, loop.create_future())
        ex.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        events = [b"data: " + orjson.dumps(tok("x", n, "length" if n == 3 else None)) + b"\n\n"
                  for n in (1, 2, 3)] + [b"data: [DONE]\n\n"]
        for i, ev in enumerate(events):
            ex.feed(b"%x\r\n%s\r\n" % (len(ev), ev))
            assert len(state.times) == min(i + 1, 3)
        ex.feed(b"0\r\n\r\n")
        assert ex.done.done()
        assert list(state.tokens) == [1, 1, 1] and state.finished
    finally:
        loop.close()


@pytest.mark.parametrize("split", [1, 13, 10_000])
def test_content_length_framing(split: int) -> None:
    """A Content-Length body ends the exchange exactly at its length."""
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY
    st = parse_all(raw, split)
    assert list(st.tokens) == [1, 2]


def test_chunk_extensions_trailers_and_interim_responses() -> None:
    """100 Continue is skipped; chunk extensions and trailers are tolerated."""
    body = b"%x;ext=1\r\n%s\r\n0\r\nX-Trailer: y\r\n\r\n" % (len(BODY), BODY)
    raw = (b"HTTP/1.1 100 Continue\r\n\r\n"
           b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    st = parse_all(raw, 5)
    assert list(st.tokens) == [1, 2]


def test_bad_http_is_a_protocol_error() -> None:
    """Garbage in place of HTTP raises ProtocolError (a ValueError)."""
    loop = asyncio.new_event_loop()
    try:
        ex = _Exchange(lambda d, t: None, loop.create_future())
        with pytest.raises(ProtocolError):
            ex.feed(b"SSH-2.0-OpenSSH\r\n\r\n")
    finally:
        loop.close()


def test_sse_multiline_comments_crlf_and_chat() -> None:
    """Comments, event: lines, CRLF line ends, role-only chat chunks; text collected."""
    st = StreamState(chat=True, t_send=0.0, want_text=True)
    role = {"choices": [{"delta": {"role": "assistant", "content": ""}}]}
    c1 = {"choices": [{"delta": {"content": "Hel"}}]}
    c2 = {"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]}
    raw = (b": ping\r\n\r\nevent: message\r\ndata: " + orjson.dumps(role) + b"\r\n\r\n"
           + b"data: " + orjson.dumps(c1) + b"\n\ndata: " + orjson.dumps(c2) + b"\n\n")
    st.feed(raw[:30], 1.0)
    st.feed(raw[30:], 2.0)
    rec = Record(index=0, scheduled=0.0)
    assert st.finish(rec) == "Hello"
    assert rec.ok and list(rec.chunk_times) == [2.0, 2.0]
    assert rec.chunk_tokens is None  # no per-chunk usage was sent


def test_error_event_fails_the_request() -> None:
    """An error event inside a 200 stream makes the request a failure."""
    st = StreamState(chat=False, t_send=0.0)
    st.feed(sse(tok("a"), {"error": {"message": "engine died"}}, done=True), 1.0)
    rec = Record(index=0, scheduled=0.0)
    st.finish(rec)
    assert not rec.ok and rec.error is not None and "engine died" in rec.error


# --- real sockets ----------------------------------------------------------------------------

Script = Callable[[bytes], bytes | None]


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], asyncio.Future[str]]]:
    """A raw TCP server answering each request with script(request) (None: close)."""
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    body = await reader.readexactly(length)
                    answer = script(body)
                    if answer is None:
                        break
                    writer.write(answer)
                    await writer.drain()
                    if b"Connection: close" in answer.split(b"\r\n\r\n")[0]:
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/completions"

    yield start  # type: ignore[misc]
    for s in servers:
        s.close()
        await s.wait_closed()


async def _send(transport: FastTransport) -> Record:
    sender = Sender(transport, endpoint="completions", model="m", t0=perf_counter())
    rec = Record(index=0, scheduled=0.0)
    await sender.send(sender.body(Item(0, (Turn(4, text="hi"),)), 0), rec)
    return rec


async def test_keep_alive_reuses_one_connection(scripted) -> None:  # type: ignore[no-untyped-def]
    """Sequential requests share a connection; the request carries our headers."""
    seen: list[bytes] = []

    def script(body: bytes) -> bytes:
        seen.append(body)
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(BODY, 30)

    url = await scripted(script)
    tr = FastTransport(url, request_headers(api_key="k"))
    for _ in range(3):
        rec = await _send(tr)
        assert rec.ok, rec.error
    assert len(tr._all) == 1
    assert orjson.loads(seen[0])["max_tokens"] == 4
    await tr.aclose()


async def test_http_error_and_close_delimited_body(scripted) -> None:  # type: ignore[no-untyped-def]
    """A 503 is a failure quoting the body; an until-close 200 body still completes."""
    answers = iter([
        b"HTTP/1.1 503 Busy\r\nContent-Length: 9\r\n\r\ntoo busy!",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY,
    ])
    url = await scripted(lambda body: next(answers))
    tr = FastTransport(url, request_headers())
    rec = await _send(tr)
    assert not rec.ok and rec.status == 503 and rec.error == "HTTP 503: too busy!"
    rec = await _send(tr)
    assert rec.ok, rec.error
    await tr.aclose()


async def test_stale_keep_alive_connection_is_retried(scripted) -> None:  # type: ignore[no-untyped-def]
    """A pooled connection the server closed is replaced once, transparently."""
    calls = 0

    def script(body: bytes) -> bytes | None:
        nonlocal calls
        calls += 1
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY
        return ok if calls != 2 else None  # the 2nd request: close without answering

    url = await scripted(script)
    tr = FastTransport(url, request_headers())
    assert (await _send(tr)).ok
    rec = await _send(tr)
    assert rec.ok, rec.error
    await tr.aclose()


async def test_midstream_disconnect_is_a_failure(scripted) -> None:  # type: ignore[no-untyped-def]
    """A server that dies mid-stream gives a failed record, not an exception."""
    url = await scripted(lambda body: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + chunked(BODY, 30)[:50])
    tr = FastTransport(url, request_headers())
    sender = Sender(tr, endpoint="completions", model="m", t0=perf_counter(), timeout_s=5)
    rec = Record(index=0, scheduled=0.0)
    task = asyncio.ensure_future(sender.send(b"{}", rec))
    await asyncio.sleep(0.2)
    await tr.aclose()  # the connection drops with the answer unfinished
    await task
    assert not rec.ok and rec.error


async def test_timeout(scripted) -> None:  # type: ignore[no-untyped-def]
    """No answer within the timeout: a 'timeout' failure."""
    url = await scripted(lambda body: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    tr = FastTransport(url, request_headers())
    sender = Sender(tr, endpoint="completions", model="m", t0=perf_counter(), timeout_s=0.2)
    rec = Record(index=0, scheduled=0.0)
    await sender.send(b"{}", rec)
    assert not rec.ok and rec.error is not None and rec.error.startswith("timeout")
    await tr.aclose()


async def test_both_http_clients_agree(scripted) -> None:  # type: ignore[no-untyped-def]
    """fast and aiohttp transports produce the same record for the same answer."""
    url = await scripted(lambda body: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + chunked(BODY, 17))
    session = make_session(0, 30)
    recs = []
    for kind in ("fast", "aiohttp"):
        tr = make_transport(kind, url, request_headers(), session)
        sender = Sender(tr, endpoint="completions", model="m", t0=perf_counter())
        rec = Record(index=0, scheduled=0.0)
        await sender.send(b"{}", rec)
        await tr.aclose()
        recs.append(rec)
    await session.close()
    fast, aio = recs
    assert fast.ok and aio.ok
    assert (fast.chunk_tokens, fast.output_tokens, fast.prompt_tokens) == (
        aio.chunk_tokens, aio.output_tokens, aio.prompt_tokens)
    assert len(fast.chunk_times) == len(aio.chunk_times) == 2


async def test_localhost_name_resolves_to_a_listening_address(scripted) -> None:  # type: ignore[no-untyped-def]
    """'localhost' may resolve to ::1 first; the transport falls back to 127.0.0.1."""
    url = await scripted(lambda body: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                         % len(BODY) + BODY)
    tr = FastTransport(url.replace("127.0.0.1", "localhost"), request_headers())
    rec = await _send(tr)
    assert rec.ok, rec.error
    await tr.aclose()
