"""bench/micro.py's HTTP/1.1 parsing cases: llhttp (httptools) against the hand-written
parsers it replaced, in the same run.

The hand-written code is loaded from git history (:data:`HANDWRITTEN_REV`, the last commit
that had it), so the comparison stays runnable without keeping a second parser in the
tree. Without git, or without that commit (a shallow clone), those cases are skipped.

Backend responses go through the whole ``data_received`` of each client — framing, body
delivery to a consumer, keep-alive bookkeeping — since that is what a streamed token costs:

- pdlb's decode leg (lb/backends/http1.py): one typical vLLM stream, a uvicorn-style head
  and 64 SSE events, one chunk per read; and the per-read cost on an open stream;
- the load generator's exchange (loadgen/transport.py), per read.

Request heads: the fast front's recognizer (lb/serve/requesthead.py: header lines through
llhttp's request parser) on a 6-header POST, against its hand-written regex version.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HANDWRITTEN_REV = "f1a7fe9"
"""The commit whose lb/backends/http1.py, loadgen/transport.py and lb/serve/requesthead.py
still had hand-written parsers."""

# A middle event and the final usage event + [DONE] of a 64-token stream (bench/micro.py
# uses the same two).
MIDDLE = (b'data: {"id":"cmpl-7f3a","object":"text_completion","created":1700000000,'
          b'"model":"m","choices":[{"index":0,"text":" token","logprobs":null,'
          b'"finish_reason":null,"stop_reason":null}],"usage":null}\n\n')
FINAL = (b'data: {"id":"cmpl-7f3a","object":"text_completion","created":1700000000,'
         b'"model":"m","choices":[],"usage":{"prompt_tokens":170,"total_tokens":234,'
         b'"completion_tokens":64,"prompt_tokens_details":{"cached_tokens":170}}}\n\n'
         b"data: [DONE]\n\n")
SSE_HEAD = (b"HTTP/1.1 200 OK\r\ndate: Mon, 07 Dec 2026 06:00:00 GMT\r\nserver: uvicorn\r\n"
            b"content-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
CHUNK = b"%x\r\n%b\r\n" % (len(MIDDLE), MIDDLE)
LAST = b"%x\r\n%b\r\n0\r\n\r\n" % (len(FINAL), FINAL)
TOKENS = 64


def _from_git(path: str, name: str) -> types.ModuleType | None:
    """The module at ``path`` as of :data:`HANDWRITTEN_REV`, or None (said on stderr)."""
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{HANDWRITTEN_REV}:{path}"],
                                capture_output=True, check=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"skipping hand-written {path}: {exc}", file=sys.stderr)
        return None
    module = types.ModuleType(name)
    module.__file__ = f"{HANDWRITTEN_REV}:{path}"
    sys.modules[name] = module  # (dataclasses and annotations look the module up)
    try:
        exec(compile(source, module.__file__, "exec"), module.__dict__)
    except Exception as exc:  # what it imported has moved since: say so, go on
        print(f"skipping hand-written {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        del sys.modules[name]
        return None
    return module


class _Transport:
    """Enough of a transport for a client connection: nothing is sent."""

    def write(self, data: bytes) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _decode_leg(module: Any, loop: asyncio.AbstractEventLoop
                ) -> tuple[Callable[[], object], Callable[[], object]]:
    """(one whole 64-token stream, one read of an open stream) through ``module._Conn``."""
    pool: list[Any] = []
    sink: list[bytes] = []

    def open_stream() -> Any:
        conn = module._Conn(pool, loop)
        conn.transport = _Transport()
        waiter = conn.send(b"", b"")
        conn.data_received(SSE_HEAD)
        waiter.result().start(sink.append, lambda error: None)
        return conn

    def whole() -> None:
        conn = open_stream()
        feed = conn.data_received
        for _ in range(TOKENS - 1):
            feed(CHUNK)
        feed(LAST)
        pool.clear()
        sink.clear()

    conn = open_stream()

    def one_read() -> None:
        conn.data_received(CHUNK)
        sink.clear()

    return whole, one_read


def _loadgen_read(module: Any, loop: asyncio.AbstractEventLoop) -> Callable[[], object]:
    """One read of an open stream through ``module._Exchange``."""
    exchange = module._Exchange(lambda data, now: None, loop.create_future())
    exchange.feed(SSE_HEAD)
    return lambda: exchange.feed(CHUNK)


def cases(loop: asyncio.AbstractEventLoop) -> dict[str, Callable[[], object]]:
    from lb.backends import http1
    from lb.serve.requesthead import parse_head
    from loadgen import transport

    out: dict[str, Callable[[], object]] = {}
    old_http1 = _from_git("lb/backends/http1.py", "_handwritten_http1")
    old_loadgen = _from_git("loadgen/transport.py", "_handwritten_loadgen")
    old_front = _from_git("lb/serve/requesthead.py", "_handwritten_requesthead")
    for label, module in (("hand-written", old_http1), ("llhttp", http1)):
        if module is not None:
            whole, one_read = _decode_leg(module, loop)
            out[f"h1: decode leg, 64-token SSE response ({label})"] = whole
            out[f"h1: decode leg, one chunk read ({label})"] = one_read
    for label, module in (("hand-written", old_loadgen), ("llhttp", transport)):
        if module is not None:
            out[f"h1: loadgen exchange, one chunk read ({label})"] = _loadgen_read(module, loop)
    wire = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
            b"Content-Type: application/json\r\nAccept: */*\r\nUser-Agent: OpenAI/Python\r\n"
            b"Authorization: Bearer sk-x\r\nContent-Length: 2\r\n\r\n{}")
    for label, fn in (("hand-written", old_front.parse_head if old_front else None),
                      ("llhttp", parse_head)):
        if fn is not None:
            out[f"h1: front request head, 6 headers ({label})"] = (
                lambda fn=fn: fn(wire, 1 << 24))
    return out
