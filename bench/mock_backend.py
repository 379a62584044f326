"""A fast mock vLLM prefill/decode pair for benchmarking proxies (not an emulator).

One process, two listening sockets (prefill, decode), raw asyncio protocols under uvloop,
every response pre-serialised as far as possible, so that the mock is never what limits a
benchmark. It speaks just enough of vLLM's OpenAI API and of the two PD handshakes that the
proxies under test use:

* vLLM NixlConnector, pull mode (pdlb, vllm-router, vLLM's toy proxy): a prefill request with
  ``kv_transfer_params.do_remote_decode`` gets a non-streamed one-token answer carrying
  ``kv_transfer_params`` (engine id, block ids, a fresh ``remote_request_id``, host, port);
  the decode checks that the params it receives are exactly ones the prefill issued.
* SGLang bootstrap (sglang-router, mini_lb): the same body goes to both servers with
  ``bootstrap_host``/``bootstrap_port``/``bootstrap_room``; the mock records the rooms seen
  on each side so the harness can check that every decode had its prefill.

Decode streams: the first event leaves with the response headers; then all active streams
advance one token per tick (``--itl-ms``, default 1 ms), each SSE event in its own HTTP
chunk and its own ``send()``, so a proxy receives the chunks separately, as from vLLM. With
``stream_options.include_usage`` a final ``"choices":[]`` usage event follows, then
``data: [DONE]``. The first event's ``system_fingerprint`` tells the client what the decode
saw: ``kv-ok`` (valid NIXL params), ``kv-bootstrap`` (SGLang fields), ``kv-none`` (neither)
or ``kv-bad`` (params that the prefill never issued).

Usage, as vLLM reports it in PD mode: the prefill's ``prompt_tokens_details.cached_tokens``
is 0 and ``remote_prefill_cached_tokens`` = 0; the decode reports ``cached_tokens`` =
``prompt_tokens`` (it counts the pulled KV as cached — vLLM #47136). The true value is 0.
prompt_tokens = UTF-8 bytes of the prompt (or of the messages' contents) // 4, at least 1.

Other routes: ``GET /health``, ``GET /v1/models``, ``GET /metrics`` (tiny, vLLM names),
``GET /mock/stats`` (counters as JSON), ``POST /mock/reset``, ``POST /mock/config``
(``{"itl_ms": 0}``: tokens as fast as the loop goes, still one write per event); anything
else is a 404.

    python bench/mock_backend.py --prefill-port 8100 --decode-port 8200
    python bench/mock_backend.py            # any free ports; prints one JSON line with them
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections import OrderedDict
from typing import Any

import orjson

ENGINE_ID = "mock-prefill-engine"
MODEL = "mock"
CREATED = 1_700_000_000
MAX_TOKENS_CAP = 4096
_ISSUED_MAX = 100_000  # remote_request_ids remembered for the decode's check
_ROOMS_MAX = 200_000


def prompt_tokens(endpoint: str, body: dict[str, Any]) -> int:
    """The mock's token count: UTF-8 bytes // 4 of the prompt text, at least 1."""
    if endpoint == "chat":
        n = 0
        for m in body.get("messages") or ():
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                n += len(c.encode())
        return max(1, n // 4)
    p = body.get("prompt")
    if isinstance(p, str):
        return max(1, len(p.encode()) // 4)
    if isinstance(p, list) and p and isinstance(p[0], int):
        return len(p)
    return max(1, len(str(p).encode()) // 4)


def token_text(i: int) -> str:
    return f" t{i}"


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class Events:
    """Pre-serialised SSE events (already HTTP-chunk framed) for one endpoint."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.object = "text_completion" if endpoint == "completions" else "chat.completion.chunk"
        self.id = "cmpl-mock" if endpoint == "completions" else "chatcmpl-mock"
        self._mid: dict[tuple[int, bool], bytes] = {}
        self.done = _chunk(b"data: [DONE]\n\n")

    def _choice(self, i: int, finish: str | None, first: bool) -> dict[str, Any]:
        if self.endpoint == "completions":
            return {"index": 0, "text": token_text(i), "logprobs": None,
                    "finish_reason": finish, "stop_reason": None}
        delta: dict[str, Any] = {"content": token_text(i)}
        if first:
            delta = {"role": "assistant", "content": token_text(i)}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish,
                "stop_reason": None}

    def token(self, i: int, last: bool) -> bytes:
        key = (i, last)
        ev = self._mid.get(key)
        if ev is None:
            ev = _chunk(_event({
                "id": self.id, "object": self.object, "created": CREATED, "model": MODEL,
                "choices": [self._choice(i, "length" if last else None, False)],
                "usage": None,
            }))
            if len(self._mid) < 2 * MAX_TOKENS_CAP:
                self._mid[key] = ev
        return ev

    def first(self, last: bool, marker: str) -> bytes:
        return _chunk(_event({
            "id": self.id, "object": self.object, "created": CREATED, "model": MODEL,
            "system_fingerprint": marker,
            "choices": [self._choice(0, "length" if last else None, True)], "usage": None,
        }))

    def usage(self, prompt: int, completion: int, cached: int) -> bytes:
        return _chunk(_event({
            "id": self.id, "object": self.object, "created": CREATED, "model": MODEL,
            "choices": [],
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt + completion,
                      "completion_tokens": completion,
                      "prompt_tokens_details": {"cached_tokens": cached}},
        }))


EVENTS = {"completions": Events("completions"), "chat": Events("chat")}
PATHS = {b"/v1/completions": "completions", b"/v1/chat/completions": "chat"}

SSE_HEADERS = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
               b"transfer-encoding: chunked\r\n\r\n")


def _response(status: bytes, body: bytes, ctype: bytes = b"application/json",
              close: bool = False) -> bytes:
    conn = b"connection: close\r\n" if close else b""
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: " + ctype
            + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n" + conn + b"\r\n"
            + body)


MODELS = orjson.dumps({"object": "list", "data": [
    {"id": MODEL, "object": "model", "created": CREATED, "owned_by": "mock",
     "max_model_len": 131072}]})


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counts: dict[str, int] = {}
        self.prefill_rooms: set[int] = set()
        self.decode_rooms: set[int] = set()

    def inc(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def room(self, which: set[int], room: Any) -> None:
        if isinstance(room, int) and len(which) < _ROOMS_MAX:
            which.add(room)

    def as_json(self) -> bytes:
        matched = len(self.decode_rooms & self.prefill_rooms)
        return orjson.dumps({**self.counts, "bootstrap_rooms_decode": len(self.decode_rooms),
                             "bootstrap_rooms_matched": matched})


class Mock:
    """State shared by both roles: issued handoffs, active streams, the tick."""

    def __init__(self, itl_s: float) -> None:
        self.itl_s = itl_s
        self.issued: OrderedDict[str, int] = OrderedDict()
        self.next_id = 0
        self.streams: list[Stream] = []
        self.stats = Stats()
        self._ticking = False
        self.loop = asyncio.get_running_loop()

    def issue(self, prompt: int) -> dict[str, Any]:
        self.next_id += 1
        rid = f"mockp-{self.next_id}"
        self.issued[rid] = prompt
        if len(self.issued) > _ISSUED_MAX:
            self.issued.popitem(last=False)
        return {"do_remote_prefill": True, "do_remote_decode": False,
                "remote_block_ids": [[1, 2, 3, 4]], "remote_engine_id": ENGINE_ID,
                "remote_request_id": rid, "remote_host": "localhost", "remote_port": 5600,
                "tp_size": 1, "remote_prefill_cached_tokens": 0}

    def check_handoff(self, body: dict[str, Any]) -> str:
        kv = body.get("kv_transfer_params")
        if isinstance(kv, dict) and kv.get("do_remote_prefill"):
            rid = kv.get("remote_request_id")
            if (kv.get("remote_engine_id") == ENGINE_ID and kv.get("remote_host")
                    and kv.get("remote_port") and kv.get("remote_block_ids") == [[1, 2, 3, 4]]
                    and self.issued.pop(rid, None) is not None):
                self.stats.inc("decode_kv_ok")
                return "kv-ok"
            self.stats.inc("decode_kv_bad")
            return "kv-bad"
        if "bootstrap_room" in body:
            self.stats.inc("decode_bootstrap")
            self.stats.room(self.stats.decode_rooms, body.get("bootstrap_room"))
            return "kv-bootstrap"
        self.stats.inc("decode_kv_none")
        return "kv-none"

    def add_stream(self, stream: Stream) -> None:
        self.streams.append(stream)
        if not self._ticking:
            self._ticking = True
            self.loop.call_later(self.itl_s, self._tick)

    def _tick(self) -> None:
        alive = []
        for s in self.streams:
            if s.step():
                alive.append(s)
        self.streams = alive
        if alive:
            self.loop.call_later(self.itl_s, self._tick)
        else:
            self._ticking = False


class Stream:
    __slots__ = ("conn", "events", "i", "include_usage", "n", "prompt")

    def __init__(self, conn: Conn, events: Events, n: int, prompt: int,
                 include_usage: bool) -> None:
        self.conn = conn
        self.events = events
        self.n = n
        self.i = 1
        self.prompt = prompt
        self.include_usage = include_usage

    def step(self) -> bool:
        """Write the next token; False when the stream is over (or the client left)."""
        t = self.conn.transport
        if t is None or t.is_closing():
            self.conn.mock.stats.inc("decode_aborted")
            return False
        i = self.i
        if i < self.n:
            t.write(self.events.token(i, i == self.n - 1))
            self.i = i + 1
            if self.i < self.n:
                return True
        tail = b""
        if self.include_usage:
            tail = self.events.usage(self.prompt, self.n, self.prompt)
        t.write(tail + self.events.done + b"0\r\n\r\n")
        self.conn.stream_done()
        return False


class Conn(asyncio.Protocol):
    """One HTTP/1.1 connection (keep-alive, no pipelining while a stream is running)."""

    def __init__(self, mock: Mock, role: str) -> None:
        self.mock = mock
        self.role = role
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is duck-typed
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    def stream_done(self) -> None:
        self.busy = False
        if self.close_after and self.transport is not None:
            self.transport.close()
        elif self.buf:
            self._process()

    def _process(self) -> None:
        while not self.busy and self.transport is not None:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end]
            lines = head.split(b"\r\n")
            try:
                method, target, _ = lines[0].split(b" ", 2)
            except ValueError:
                self.transport.write(_response(b"400 Bad Request", b"{}", close=True))
                self.transport.close()
                return
            length = 0
            chunked = False
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            start = head_end + 4
            if chunked:
                parsed = _dechunk(self.buf, start)
                if parsed is None:
                    return
                body, end = parsed
            else:
                end = start + length
                if len(self.buf) < end:
                    return
                body = self.buf[start:end]
            self.buf = self.buf[end:]
            self.close_after = close
            self._dispatch(method, target.split(b"?", 1)[0], body)
            if close and not self.busy and self.transport is not None:
                self.transport.close()

    def _dispatch(self, method: bytes, path: bytes, body: bytes) -> None:
        t = self.transport
        assert t is not None
        if method == b"POST" and path in PATHS:
            self._completion(PATHS[path], body)
        elif path == b"/health":
            t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        elif path == b"/v1/models":
            t.write(_response(b"200 OK", MODELS))
        elif path == b"/metrics":
            running = sum(1 for s in self.mock.streams if s.conn.role == self.role)
            text = (f"vllm:num_requests_running{{model_name=\"{MODEL}\"}} {running}\n"
                    f"vllm:num_requests_waiting{{model_name=\"{MODEL}\"}} 0\n"
                    f"vllm:kv_cache_usage_perc{{model_name=\"{MODEL}\"}} 0.0\n").encode()
            t.write(_response(b"200 OK", text, b"text/plain; version=0.0.4"))
        elif path == b"/v1/traces" and method == b"POST":  # an OTLP/HTTP sink (bench --tracing)
            self.mock.stats.inc("otlp exports")
            t.write(_response(b"200 OK", b"", b"application/x-protobuf"))
        elif path == b"/mock/stats":
            t.write(_response(b"200 OK", self.mock.stats.as_json()))
        elif path == b"/mock/reset" and method == b"POST":
            self.mock.stats.reset()
            t.write(_response(b"200 OK", b"{}"))
        elif path == b"/mock/config" and method == b"POST":
            try:
                self.mock.itl_s = float(orjson.loads(body)["itl_ms"]) / 1000
            except (ValueError, KeyError, TypeError):
                t.write(_response(b"400 Bad Request", b'{"error":{"message":"itl_ms?"}}'))
                return
            t.write(_response(b"200 OK", b"{}"))
        else:
            self.mock.stats.inc(f"404 {method.decode()} {path.decode(errors='replace')}")
            t.write(_response(b"404 Not Found", b'{"error":{"message":"not found"}}'))

    def _completion(self, endpoint: str, raw: bytes) -> None:
        t = self.transport
        assert t is not None
        try:
            body = orjson.loads(raw)
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            t.write(_response(b"400 Bad Request", b'{"error":{"message":"bad json"}}'))
            return
        prompt = prompt_tokens(endpoint, body)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        n = max(1, min(int(max_tokens), MAX_TOKENS_CAP))
        stream = bool(body.get("stream"))
        if self.role == "prefill":
            self._prefill(endpoint, body, prompt, n, stream)
            return
        self.mock.stats.inc("decode_requests")
        marker = self.mock.check_handoff(body)
        events = EVENTS[endpoint]
        if not stream:
            text = "".join(token_text(i) for i in range(n))
            choice: dict[str, Any] = ({"index": 0, "text": text, "finish_reason": "length"}
                                      if endpoint == "completions" else
                                      {"index": 0, "finish_reason": "length", "message":
                                       {"role": "assistant", "content": text}})
            t.write(_response(b"200 OK", orjson.dumps({
                "id": events.id, "object": "text_completion" if endpoint == "completions"
                else "chat.completion", "created": CREATED, "model": MODEL,
                "system_fingerprint": marker, "choices": [choice],
                "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                          "total_tokens": prompt + n,
                          "prompt_tokens_details": {"cached_tokens": prompt}}})))
            return
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        t.write(SSE_HEADERS + events.first(n == 1, marker))
        s = Stream(self, events, n, prompt, include_usage)
        if n == 1:
            s.step()  # writes usage/[DONE] and the terminator at once
            return
        self.busy = True
        self.mock.add_stream(s)

    def _prefill(self, endpoint: str, body: dict[str, Any], prompt: int, n: int,
                 stream: bool) -> None:
        t = self.transport
        assert t is not None
        st = self.mock.stats
        st.inc("prefill_requests")
        kv = body.get("kv_transfer_params")
        answer: dict[str, Any] = {
            "id": "cmpl-mockp", "object": "text_completion" if endpoint == "completions"
            else "chat.completion", "created": CREATED, "model": MODEL,
            "choices": [{"index": 0, "text": token_text(0), "finish_reason": "length",
                         "stop_reason": None}] if endpoint == "completions" else
            [{"index": 0, "message": {"role": "assistant", "content": token_text(0)},
              "finish_reason": "length", "stop_reason": None}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": 1,
                      "total_tokens": prompt + 1, "prompt_tokens_details": None},
        }
        if isinstance(kv, dict) and kv.get("do_remote_decode"):
            st.inc("prefill_kv_producer")
            answer["kv_transfer_params"] = self.mock.issue(prompt)
        if "bootstrap_room" in body:
            st.inc("prefill_bootstrap")
            st.room(st.prefill_rooms, body.get("bootstrap_room"))
        if stream:  # SGLang sends the client's body (stream true) to the prefill too
            t.write(SSE_HEADERS + _chunk(_event(answer)) + EVENTS[endpoint].done
                    + b"0\r\n\r\n")
        else:
            t.write(_response(b"200 OK", orjson.dumps(answer)))


def _dechunk(buf: bytes, pos: int) -> tuple[bytes, int] | None:
    parts = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buf[pos:eol].split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                return None
            return b"".join(parts), end + 2
        if len(buf) < pos + size + 2:
            return None
        parts.append(buf[pos:pos + size])
        pos += size + 2


async def serve(host: str, prefill_port: int, decode_port: int, itl_s: float) -> None:
    loop = asyncio.get_running_loop()
    mock = Mock(itl_s)
    servers = []
    ports = {}
    for role, port in (("prefill", prefill_port), ("decode", decode_port)):
        server = await loop.create_server(lambda r=role: Conn(mock, r), host, port,
                                          backlog=4096)
        servers.append(server)
        ports[role] = server.sockets[0].getsockname()[1]
    print(orjson.dumps({"prefill": f"http://{host}:{ports['prefill']}",
                        "decode": f"http://{host}:{ports['decode']}",
                        "pid": os.getpid()}).decode(), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--prefill-port", type=int, default=0)
    p.add_argument("--decode-port", type=int, default=0)
    p.add_argument("--itl-ms", type=float, default=1.0,
                   help="time between two tokens of a stream (all streams tick together)")
    args = p.parse_args(argv)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    import gc

    gc.freeze()
    runner(serve(args.host, args.prefill_port, args.decode_port, args.itl_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
