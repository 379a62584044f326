"""How fast can one loadgen process drive streams honestly? Measure it on this machine.

Starts a trivial OpenAI-style SSE server in a subprocess (raw asyncio + uvloop, so that the
server is never the bottleneck; pinned to one core, the client to another when there are
two), which streams every token as its own SSE event and HTTP chunk: all active streams
advance one token per tick (default 5 ms), 64 tokens per request, with per-chunk usage as
vLLM's ``continuous_usage_stats`` sends it. Then runs ``python -m loadgen`` (a fresh process
each time) at rising open-loop rates and prints, per rate: achieved throughput, schedule lag,
TTFT/ITL, the client's CPU use and its time from launch to first send. The ceiling is the
highest rate at which p99 schedule lag < 5 ms, nothing failed and the send rate kept up.

    python bench/loadgen_ceiling.py                       # default rates
    python bench/loadgen_ceiling.py --rates 1000,1500,2000 --duration 10
    python bench/loadgen_ceiling.py --serve 8765          # only the server
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
LAG_LIMIT_MS = 5.0


# --- the trivial SSE server ------------------------------------------------------------------

class _Stream:
    __slots__ = ("left", "prompt_tokens", "sent", "transport", "usage")

    def __init__(self, transport: asyncio.Transport, tokens: int, prompt_tokens: int,
                 usage: bool) -> None:
        self.transport = transport
        self.left = tokens
        self.sent = 0
        self.prompt_tokens = prompt_tokens
        self.usage = usage


_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
         b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n")
_MODELS = orjson.dumps({"object": "list", "data": [{"id": "bench", "root": "bench"}]})


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(s: _Stream) -> bytes:
    finish = b'"length"' if s.left == 0 else b"null"
    usage = (b',"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}'
             % (s.prompt_tokens, s.sent, s.prompt_tokens + s.sent)) if s.usage else b""
    return _chunk(b'data: {"id":"cmpl-b","object":"text_completion","model":"bench",'
                  b'"choices":[{"index":0,"text":" tok","finish_reason":%s}]%s}\n\n'
                  % (finish, usage))


class _Server:
    def __init__(self, tick_s: float) -> None:
        self.tick_s = tick_s
        self.active: list[_Stream] = []

    async def ticker(self) -> None:
        loop = asyncio.get_running_loop()
        nxt = loop.time()
        while True:
            nxt += self.tick_s
            await asyncio.sleep(max(0.0, nxt - loop.time()))
            self.active = [s for s in self.active
                           if not s.transport.is_closing() and self.step(s)]

    @staticmethod
    def step(s: _Stream) -> bool:
        """Write the stream's next token event; False once it is finished."""
        s.left -= 1
        s.sent += 1
        out = _event(s)
        if s.left == 0:
            final = (b'data: {"id":"cmpl-b","object":"text_completion","model":"bench",'
                     b'"choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,'
                     b'"total_tokens":%d}}\n\n'
                     % (s.prompt_tokens, s.sent, s.prompt_tokens + s.sent))
            out += _chunk(final) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        s.transport.write(out)
        return s.left > 0


class _Proto(asyncio.Protocol):
    def __init__(self, server: _Server) -> None:
        self.server = server
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is duck-typed

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            self.handle(head.split(" ", 2), body)

    def handle(self, request_line: list[str], body: bytes) -> None:
        assert self.transport is not None
        method, path = request_line[0], request_line[1]
        if method == "GET":
            payload = _MODELS if path.startswith("/v1/models") else b"not found"
            status = b"200 OK" if path.startswith("/v1/models") else b"404 Not Found"
            self.transport.write(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (status, len(payload), payload))
            return
        req = orjson.loads(body)
        so = req.get("stream_options") or {}
        prompt = req.get("prompt") or ""
        tokens = int(req.get("max_tokens") or 16)
        self.transport.write(_HEAD)
        stream = _Stream(self.transport, tokens, max(1, len(prompt) // 4),
                         bool(so.get("continuous_usage_stats")))
        if self.server.tick_s > 0:
            self.server.active.append(stream)
        else:  # burst: every token written at once, one write per event
            while stream.left:
                self.server.step(stream)


def serve(port: int, tick_s: float) -> None:
    import uvloop

    async def main() -> None:
        server = _Server(tick_s)
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: _Proto(server), "127.0.0.1", port, backlog=4096)
        ticker = asyncio.ensure_future(server.ticker() if tick_s > 0 else asyncio.sleep(0))
        print("ready", flush=True)
        async with srv:
            await srv.serve_forever()
        ticker.cancel()

    uvloop.run(main())


# --- the measurement -------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin(pid: int, cpu: int) -> None:
    with contextlib.suppress(AttributeError, OSError):
        if os.cpu_count() and os.cpu_count() >= 2:  # type: ignore[operator]
            os.sched_setaffinity(pid, {cpu})


def cpu_pressure() -> float | None:
    """Linux PSI: % of the last 10 s in which some runnable task waited for a CPU."""
    try:
        with open("/proc/pressure/cpu") as fh:
            first = fh.readline().split()
        return float(first[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def run_client(url: str, rate: float, duration: float, workers: int,
               extra: list[str], pin: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "loadgen", "--url", url, "--model", "bench",
               "--rate", str(rate), "--duration", str(duration), "--input-len", "32",
               "--output-len", "64", "--no-progress", "-q", "--out", str(out),
               "--workers", str(workers), *extra]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        launched = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if workers == 1 and pin:
            _pin(proc.pid, 0)
        try:
            _, err = proc.communicate(timeout=duration * 4 + 120)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        wall = time.time() - launched
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if not out.exists():
            raise RuntimeError(f"loadgen failed (rc {proc.returncode}): {err.decode()[-2000:]}")
        data = orjson.loads(out.read_bytes())
    s, meta = data["summary"], data["meta"]
    psi = cpu_pressure()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    first = meta["t0_epoch"] + (meta.get("first_send") or 0.0)
    return {
        "rate": rate, "summary": s, "cpu_s": cpu, "wall_s": wall,
        "cpu_per_s": meta["client_cpu_s"] / meta["client_wall_s"],
        "process_cpu_s": cpu,
        "preempted_per_s": (after.ru_nivcsw - before.ru_nivcsw) / wall,
        "cpu_pressure_pct": psi,
        "launch_to_first_send_s": first - launched,
    }


def passed(r: dict[str, Any]) -> bool:
    s = r["summary"]
    return (s["failed"] == 0 and s["not_sent"] == 0
            and (s["schedule_lag_ms"]["p99"] or 0.0) < LAG_LIMIT_MS
            and (s["send_rate"] or 0.0) >= 0.95 * (s["offered_rate"] or r["rate"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--serve", type=int, metavar="PORT", help="only run the SSE server")
    ap.add_argument("--tick-ms", type=float, default=0.0,
                    help="server: 0 (default) writes a request's 64 events back to back, one "
                         "write each; T > 0 paces them, one token per stream every T ms (one "
                         "client read per token: the hardest case)")
    ap.add_argument("--rates", default="250,500,1000,1500,2000,2500",
                    help="open-loop rates to try, rising (req/s)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--pin", action="store_true",
                    help="pin the server to CPU 1 and the client to CPU 0 (quiet machines only)")
    ap.add_argument("--keep-going", action="store_true",
                    help="try every rate even after one fails")
    ap.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally clauses
    if args.serve is not None:
        serve(args.serve, args.tick_ms / 1000.0)
        return 0

    port = _free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--tick-ms",
                               str(args.tick_ms)], stdout=subprocess.PIPE, cwd=ROOT)
    if args.pin:
        _pin(server.pid, 1)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != b"ready":
            raise RuntimeError("the SSE server did not start")
        url = f"http://127.0.0.1:{port}"
        pace = (f"one SSE event per token every {args.tick_ms:g} ms" if args.tick_ms > 0
                else "64 SSE events written back to back")
        print(f"server: 127.0.0.1:{port}, 64 tokens/request, {pace}; client: python -m "
              f"loadgen, {args.workers} worker(s); {os.cpu_count()} CPUs; "
              f"load average {os.getloadavg()[0]:.2f}")
        head = (f"{'rate':>7} {'achieved':>9} {'lag p50':>8} {'lag p99':>8} {'lag max':>8} "
                f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p99':>8} {'failed':>7} "
                f"{'CPU/s':>6} {'preempt/s':>9} {'PSI%':>5} {'1st send':>9}  verdict")
        print(head)
        print("-" * len(head))
        results = []
        best = None
        for rate in (float(x) for x in args.rates.split(",")):
            r = run_client(url, rate, args.duration, args.workers, [], args.pin)
            results.append(r)
            s = r["summary"]
            ok = passed(r)
            best = rate if ok else best
            print(f"{rate:>7g} {s['request_throughput']:>9.1f} "
                  f"{s['schedule_lag_ms']['p50']:>8.2f} {s['schedule_lag_ms']['p99']:>8.2f} "
                  f"{s['schedule_lag_ms']['max']:>8.1f} {s['ttft_ms']['p50']:>9.2f} "
                  f"{s['ttft_ms']['p99']:>9.2f} {s['itl_ms']['p99']:>8.2f} {s['failed']:>7} "
                  f"{r['cpu_per_s']:>6.2f} {r['preempted_per_s']:>9.0f} "
                  f"{(r['cpu_pressure_pct'] or 0):>5.0f} "
                  f"{r['launch_to_first_send_s']:>8.2f}s  "
                  f"{'ok' if ok else 'FELL BEHIND / FAILED'}", flush=True)
            if not ok and not args.keep_going:
                break
        print()
        if best is None:
            print("ceiling: below the lowest rate tried")
        else:
            print(f"ceiling: {best:g} req/s sustained with p99 schedule lag < {LAG_LIMIT_MS:g} ms "
                  f"(streamed 64-token responses, one process)" if args.workers == 1 else
                  f"ceiling: {best:g} req/s with {args.workers} workers")
        print("CPU/s = the client's CPU seconds per second while sending and receiving "
              "(1.00 = one core, start-up and report excluded); preempt/s = times per second "
              "the client was involuntarily descheduled; PSI% = share of the last 10 s in which "
              "some task waited for a CPU (Linux pressure stall info: other load); "
              "1st send = launch of the loadgen process → its first request")
        if args.json:
            Path(args.json).write_bytes(orjson.dumps({"results": results, "ceiling": best},
                                                     option=orjson.OPT_INDENT_2))
        return 0
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(5)


if __name__ == "__main__":
    raise SystemExit(main())
