"""A small, cheap load client for bench/compare.py: raw HTTP/1.1 over asyncio + uvloop.

It does one thing the team's loadgen does not need to: cost as little CPU as possible per
streamed chunk, so it can share this 2-core machine with the proxy under test. Each socket
read goes through llhttp (lb/backends/h1response.py, the parser pdlb's own backend client
uses; one C call per read) and its body bytes are appended as they are (plus a
``b"data:" in body`` test until the first event arrived: that instant is the TTFT); the
body is checked only once, after its end.

Three modes, one JSON summary on stdout:

    latency  --n N            one request at a time (concurrency 1): TTFT / E2E percentiles
    rate     --rate R --duration T   open loop: request k is sent at start + k/R, whatever
                                     the earlier ones are doing
    closed   --conc C --duration T   C requests always in flight: max throughput

Target: ``--url http://host:port`` (a proxy), or ``--direct PREFILL_URL DECODE_URL``: the
client plays a zero-cost proxy itself — it POSTs the prefill leg (max_tokens 1, stream
false, ``kv_transfer_params.do_remote_decode``), reads the answer's ``kv_transfer_params``
and streams the decode leg with them. Added latency of a proxy = its numbers minus these;
in latency mode, give both and the two alternate request by request (the summary then has
a ``direct`` block measured over the same minutes).

Checks per response (the ``correct`` block): HTTP 200; the token texts ``" t0" .. " t{n-1}"``
all there in order; ``data: [DONE]`` last; a usage event with the right prompt/completion
token counts; the decode saw the handoff (first event's ``system_fingerprint`` from the mock
is ``kv-ok`` or ``kv-bootstrap``); and whether ``cached_tokens`` is the truth (0: the
prefill's) rather than the decode's figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import socket
import sys
import time
from collections import Counter, deque
from typing import Any
from urllib.parse import urlsplit

import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mock_backend import prompt_tokens  # bench/ is not a package

from lb.backends.h1response import BadResponse, ResponseParser

DEFAULT_PROMPT = (
    "You are a helpful assistant. Summarise the following paragraph in one sentence. "
    "Disaggregated serving splits the prompt phase and the token-by-token phase of a "
    "language model across two pools of servers, so that long prompts no longer stall the "
    "streams of other users, and each pool can be sized for its own bottleneck: compute for "
    "the prefill, memory bandwidth for the decode. A front door routes each request to one "
    "server of each pool and moves the attention cache between them. "
) * 2

_TOKEN_RE = re.compile(rb'"(?:text|content)":" t(\d+)"')


class Response:
    __slots__ = ("body", "error", "status", "t_end", "t_first", "t_start")

    def __init__(self, t_start: float) -> None:
        self.t_start = t_start
        self.t_first = 0.0
        self.t_end = 0.0
        self.status = 0
        self.body = b""
        self.error = ""


class Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.fut: asyncio.Future[Response] | None = None
        self.resp: Response | None = None
        self.closed = False
        self.parser = ResponseParser()
        self.parts: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.fut is not None and not self.fut.done():
            r = self.resp
            assert r is not None
            if exc is None and self.parser.eof():  # a body without a length ends here
                self._finish()
            else:
                r.error = "connection_lost"
                r.t_end = time.perf_counter()
                self.fut.set_result(r)

    def request(self, data: bytes, fut: asyncio.Future[Response], t0: float) -> None:
        self.parser = ResponseParser()
        self.parts = []
        self.fut = fut
        self.resp = Response(t0)
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        r = self.resp
        if r is None:
            return
        try:
            body = self.parser.feed(data)
        except BadResponse as exc:
            r.error = f"bad_response: {exc}"
            r.t_end = time.perf_counter()
            self.resp = None
            self.transport.close()
            self.closed = True
            if self.fut is not None and not self.fut.done():
                self.fut.set_result(r)
            return
        if body:
            if not r.t_first and b"data:" in body:
                r.t_first = time.perf_counter()
            self.parts.append(body)
        if self.parser.complete:
            self._finish()

    def _finish(self) -> None:
        r = self.resp
        fut = self.fut
        assert r is not None and fut is not None
        r.t_end = time.perf_counter()
        r.status = self.parser.status
        r.body = b"".join(self.parts)
        if not r.t_first:
            r.t_first = r.t_end
        self.resp = None
        self.fut = None
        if (not self.parser.keep_alive or self.parser.extra) and self.transport is not None:
            self.transport.close()
            self.closed = True
        if not fut.done():
            fut.set_result(r)


class Target:
    """A host:port with a pool of idle keep-alive connections."""

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.hostport = f"{self.host}:{self.port}".encode()
        self.idle: deque[Conn] = deque()
        self.opened = 0

    def request_bytes(self, path: str, body: bytes) -> bytes:
        return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + self.hostport
                + b"\r\nContent-Type: application/json\r\nAccept: */*\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body)

    async def send(self, data: bytes, t0: float | None = None) -> Response:
        loop = asyncio.get_running_loop()
        conn = None
        while self.idle:
            c = self.idle.pop()
            if not c.closed:
                conn = c
                break
        if t0 is None:
            t0 = time.perf_counter()
        if conn is None:
            try:
                _, conn = await loop.create_connection(Conn, self.host, self.port)
            except OSError as exc:
                r = Response(t0)
                r.error = f"connect: {exc.strerror or exc}"
                r.t_end = time.perf_counter()
                return r
            self.opened += 1
        fut: asyncio.Future[Response] = loop.create_future()
        conn.request(data, fut, t0)
        try:
            r = await fut
        except asyncio.CancelledError:
            conn.transport.close()
            raise
        if not conn.closed and not r.error:
            self.idle.append(conn)
        return r


class Workload:
    def __init__(self, args: argparse.Namespace) -> None:
        self.endpoint = args.endpoint
        self.path = "/v1/completions" if args.endpoint == "completions" else "/v1/chat/completions"
        self.n = args.tokens
        prompt = args.prompt or DEFAULT_PROMPT
        body: dict[str, Any] = {"model": "mock", "max_tokens": self.n, "stream": True,
                                "stream_options": {"include_usage": True}, "temperature": 0}
        if args.endpoint == "completions":
            body["prompt"] = prompt
        else:
            body["messages"] = [{"role": "user", "content": prompt}]
        self.body = body
        self.expected_prompt = prompt_tokens(args.endpoint, body)
        self.expected_tokens = [str(i).encode() for i in range(self.n)]
        self.direct = bool(args.direct)
        self.proxy: Target | None = Target(args.url) if args.url else None
        if self.proxy is not None:
            self.req = self.proxy.request_bytes(self.path, orjson.dumps(body))
        if args.direct:
            self.prefill = Target(args.direct[0])
            self.decode = Target(args.direct[1])
            pbody = dict(body, max_tokens=1, stream=False)
            pbody.pop("stream_options")
            pbody["kv_transfer_params"] = {
                "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                "remote_block_ids": None, "remote_host": None, "remote_port": None}
            self.prefill_req = self.prefill.request_bytes(self.path, orjson.dumps(pbody))

    async def one(self, t0: float | None = None) -> Response:
        """One request through the proxy when there is one, else the direct path."""
        if self.proxy is not None:
            return await self.proxy.send(self.req, t0)
        return await self.one_direct(t0)

    async def one_direct(self, t0: float | None = None) -> Response:
        if t0 is None:
            t0 = time.perf_counter()
        p = await self.prefill.send(self.prefill_req, t0)
        if p.error or p.status != 200:
            return p
        kv = orjson.loads(p.body).get("kv_transfer_params")
        dbody = dict(self.body, kv_transfer_params=kv)
        return await self.decode.send(self.decode.request_bytes(self.path, orjson.dumps(dbody)), t0)

    def check(self, r: Response, tally: Counter[str]) -> bool:
        if r.error:
            tally["err_" + r.error.split(":")[0]] += 1
            return False
        if r.status != 200:
            tally[f"err_http_{r.status}"] += 1
            return False
        body = r.body
        ok = True
        if [m.group(1) for m in _TOKEN_RE.finditer(body)] == self.expected_tokens:
            tally["tokens_ok"] += 1
        else:
            ok = False
        if body.rstrip().endswith(b"data: [DONE]"):
            tally["done_ok"] += 1
        else:
            ok = False
        usage = _final_usage(body)
        if (usage is not None and usage.get("completion_tokens") == self.n
                and usage.get("prompt_tokens") == self.expected_prompt
                and usage.get("total_tokens") == self.n + self.expected_prompt):
            tally["usage_ok"] += 1
            details = usage.get("prompt_tokens_details") or {}
            if isinstance(details, dict) and details.get("cached_tokens", 0) == 0:
                tally["cached_true"] += 1
        else:
            ok = False
        head = body[:400]
        if b'"system_fingerprint":"kv-ok"' in head:
            tally["kv_ok"] += 1
        elif b'"system_fingerprint":"kv-bootstrap"' in head:
            tally["kv_bootstrap"] += 1
        else:
            ok = False
        if ok:
            tally["ok"] += 1
        else:
            tally["incorrect"] += 1
        return ok


def _final_usage(body: bytes) -> dict[str, Any] | None:
    for marker in (b'"choices":[]', b'"choices": []'):
        at = body.rfind(marker)
        if at >= 0:
            start = body.rfind(b"data:", 0, at)
            end = body.find(b"\n\n", at)
            try:
                event = orjson.loads(body[start + 5:end if end >= 0 else None])
            except orjson.JSONDecodeError:
                return None
            usage = event.get("usage") if isinstance(event, dict) else None
            return usage if isinstance(usage, dict) else None
    return None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def summarise(w: Workload, results: list[Response], wall: float, extra: dict[str, Any]
              ) -> dict[str, Any]:
    tally: Counter[str] = Counter()
    ttft: list[float] = []
    e2e: list[float] = []
    for r in results:
        if w.check(r, tally):
            ttft.append((r.t_first - r.t_start) * 1000)
            e2e.append((r.t_end - r.t_start) * 1000)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out: dict[str, Any] = {
        "requests": len(results), "ok": tally.get("ok", 0),
        "errors": sum(v for k, v in tally.items() if k.startswith("err_")),
        "incorrect": tally.get("incorrect", 0), "wall_s": round(wall, 3),
        "rps": round(tally.get("ok", 0) / wall, 1) if wall else None,
        "ttft_ms": {f"p{q}": _pct(ttft, q) for q in (50, 90, 99)},
        "e2e_ms": {f"p{q}": _pct(e2e, q) for q in (50, 90, 99)},
        "tally": dict(tally), "client_cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
        "tokens": w.n,
    }
    out.update(extra)
    return out


async def run_latency(w: Workload, n: int, warmup: int) -> dict[str, Any]:
    """Concurrency 1. With both a proxy and the direct path, alternate them request by
    request, so both see the same machine (its noise is shared, not added to the difference)."""
    both = w.proxy is not None and w.direct
    for _ in range(warmup):
        await w.one()
        if both:
            await w.one_direct()
    results: list[Response] = []
    direct: list[Response] = []
    t = time.perf_counter()
    for i in range(n):
        if both and i % 2:
            direct.append(await w.one_direct())
            results.append(await w.one())
        else:
            results.append(await w.one())
            if both:
                direct.append(await w.one_direct())
        await asyncio.sleep(0.001)  # let the loops settle between requests
    wall = time.perf_counter() - t
    out = summarise(w, results, wall, {})
    if both:
        out["direct"] = summarise(w, direct, wall, {})
    return out


async def run_rate(w: Workload, rate: float, duration: float) -> dict[str, Any]:
    total = int(rate * duration)
    results: list[Response] = []
    lags: list[float] = []
    tasks = set()

    async def fire(t0: float) -> None:
        results.append(await w.one(t0))

    start = time.perf_counter() + 0.05
    for k in range(total):
        due = start + k / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.perf_counter()
        lags.append((now - due) * 1000)
        task = asyncio.create_task(fire(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    send_end = time.perf_counter()
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    wall = time.perf_counter() - start
    return summarise(w, results, wall, {
        "offered_rps": rate, "send_s": round(send_end - start, 3),
        "lag_ms": {"p50": _pct(lags, 50), "p99": _pct(lags, 99), "max": max(lags, default=0)},
        "unfinished": total - len(results)})


async def run_closed(w: Workload, conc: int, duration: float) -> dict[str, Any]:
    results: list[Response] = []
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        while time.perf_counter() < deadline:
            results.append(await w.one())

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return summarise(w, results, time.perf_counter() - t, {"conc": conc})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("mode", choices=["latency", "rate", "closed"])
    p.add_argument("--url", help="the proxy's base URL")
    p.add_argument("--direct", nargs=2, metavar=("PREFILL_URL", "DECODE_URL"),
                   help="no proxy: do the prefill leg and the decode leg from here (with "
                        "--url too, in latency mode: alternate proxy and direct requests)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--tokens", type=int, default=64, help="max_tokens (= chunks streamed)")
    p.add_argument("--prompt", help="prompt text (default: a ~150-token paragraph)")
    p.add_argument("--n", type=int, default=200, help="latency: requests measured")
    p.add_argument("--warmup", type=int, default=20, help="latency: requests not measured")
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--conc", type=int, default=64)
    p.add_argument("--duration", type=float, default=10.0)
    args = p.parse_args(argv)
    if not args.url and not args.direct:
        p.error("give --url, --direct, or (latency mode) both")

    async def go() -> dict[str, Any]:
        w = Workload(args)
        if args.mode == "latency":
            return await run_latency(w, args.n, args.warmup)
        if args.mode == "rate":
            return await run_rate(w, args.rate, args.duration)
        return await run_closed(w, args.conc, args.duration)

    try:
        import uvloop
        result = uvloop.run(go())
    except ImportError:  # pragma: no cover
        result = asyncio.run(go())
    print(orjson.dumps(result).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
