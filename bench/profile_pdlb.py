"""Where does pdlb's CPU go? Profile it under a fixed open-loop load on the mock backend.

    .venv/bin/python bench/profile_pdlb.py                 # py-spy + perf, ~1.5 min
    .venv/bin/python bench/profile_pdlb.py --rate 150 --duration 15 --no-perf

Starts bench/mock_backend.py and ``pdlb serve`` (stock, one process), then:

1. measures pdlb's CPU per request without a profiler (open loop, 64-token streams, and
   8-token streams for the per-request/per-chunk split), from /proc;
2. records the same load under ``py-spy record`` (``pip install py-spy``; samples the
   Python stacks; native time such as a send() syscall is charged to the Python frame that
   made it) and prints the top frames by self and by inclusive share, converted to
   µs per request with the unprofiled CPU/request;
3. with ``perf`` on PATH, records the same load with ``perf record`` and prints the share
   of kernel vs. each user-space library (how much is syscalls/TCP, how much is CPython);
4. at concurrency 1, interleaved with the direct path, the client-seen added TTFT next to
   pdlb's own stage histograms (token counting, prefill leg, decode headers, its TTFT).

The report also goes to ``bench/results/profile-<UTC time>.md``, next to py-spy's collapsed
stacks (``*.pyspy-collapsed.txt``: flamegraph.pl or speedscope read them).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare as cmp  # bench/ is not a package

SAMPLE_HZ = 250
_LINE = re.compile(r":\d+\)$")
_PREFIXES = (re.compile(r"/[^ ]*/site-packages/"), re.compile(r"/[^ ]*/lib/python3\.\d+/"),
             re.compile(re.escape(str(cmp.ROOT)) + "/"))


def _frame(f: str) -> str:
    f = _LINE.sub(")", f)
    for p in _PREFIXES:
        f = p.sub("", f)
    return f


# Exclusive buckets, in priority order: a sample goes to the first bucket with a frame
# anywhere in its stack (so "write chunks" holds the send() under StreamResponse.write, and a
# metric observed inside the relay counts as metrics). The process's root frames (cli,
# server.run, the asyncio runner) are ignored, so a sample with nothing else on its stack is
# the event loop itself: uvloop's C code and the syscalls it makes (epoll, recv).
ROOT_FRAMES = ("lb/cli.py", "lb/serve/server.py", "asyncio/runners.py", "uvloop/__init__",
               "<frozen runpy>")
CATEGORIES = [
    ("token counting (lb/tokens.py, tiktoken)", ("lb/tokens.py",)),
    ("metrics (lb/metrics.py, prometheus_client)", ("lb/metrics.py", "prometheus_client/")),
    ("SSE relay: usage search/rewrite (lb/stream/relay.py)", ("lb/stream/relay.py",)),
    ("write chunks to the client (StreamResponse.write, incl. send())",
     ("StreamResponse.write (", "StreamResponse.write_eof (")),
    ("client response headers (StreamResponse.prepare)", ("StreamResponse.prepare (",)),
    ("read the decode stream (aiohttp client protocol, iter_any)",
     ("AsyncStreamIterator.__anext__", "ResponseHandler.data_received",
      "StreamReader.")),
    ("prefill leg (Upstream.post_json: aiohttp client request + JSON)",
     ("Upstream.post_json (",)),
    ("decode leg request (Upstream.open_stream)", ("Upstream.open_stream (",)),
    ("client request parse (lb/request.py)", ("lb/request.py",)),
    ("fast decode path (lb/backends/http1.py, lb/stream/pipe.py: upstream reads, relay loop,"
     " send() to the client)", ("lb/backends/http1.py", "lb/stream/pipe.py")),
    ("the front: request heads and answers on the wire (lb/serve/requesthead.py,"
     " lb/serve/rawside.py, FrontProtocol)",
     ("lb/serve/requesthead.py", "lb/serve/rawside.py", "FrontProtocol.data_received",
      "FrontProtocol._next", "lb/serve/guard.py")),
    ("health checks and /metrics scrapes (lb/backends/health.py, lb/backends/scrape.py)",
     ("lb/backends/health.py", "lb/backends/scrape.py")),
    ("other pdlb code (lb/, policies/)", ("lb/", "policies/")),
    ("aiohttp server (request parsing, handler task)", ("aiohttp/web_", "aiohttp/http_")),
    ("other aiohttp / asyncio", ("aiohttp/", "asyncio/", "aiohappyeyeballs/")),
]


def _category(frames: list[str]) -> str:
    inner = [f for f in frames if not any(r in f for r in ROOT_FRAMES)]
    for name, patterns in CATEGORIES:
        if any(p in f for f in inner for p in patterns):
            return name
    if not inner:
        return "event loop: uvloop C code and its syscalls (epoll, recv), no Python frame"
    return "other"


EVENT_LOOP = "event loop: uvloop C code and its syscalls (epoll, recv), no Python frame"


def summarise_pyspy(raw: Path, per_request_us: float, top: int, busy_samples: float) -> str:
    """Buckets and frames in µs per request. py-spy cannot always tell a loop sleeping in
    epoll_wait from one working in C, so it records more "active" samples than the process
    had CPU time (``busy_samples`` = CPU seconds × sampling rate); the excess is idle time
    and comes off the bare event-loop bucket (the only place it can be)."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    cats: collections.Counter[str] = collections.Counter()
    recorded = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        recorded += count
        frames = [_frame(f) for f in stack.split(";")]
        self_c[frames[-1]] += count
        cats[_category(frames)] += count
        for f in set(frames):
            incl[f] += count
    if not recorded:
        return "py-spy recorded no samples"
    idle = min(cats[EVENT_LOOP], max(0, round(recorded - busy_samples)))
    cats[EVENT_LOOP] -= idle
    for f in list(self_c):
        if f.startswith("Runner.run"):
            self_c[f] -= idle
    total = recorded - idle
    us = per_request_us / total
    out = [f"py-spy: {recorded} samples, {idle} of them idle (more samples than CPU time; "
           "taken off the bare event loop); µs/req = share × unprofiled CPU per request", "",
           "| bucket | % | µs/req |", "|---|---:|---:|"]
    for name, c in cats.most_common():
        out.append(f"| {name} | {100 * c / total:.1f} | {c * us:.0f} |")
    out += ["", "| self % | µs/req | frame |", "|---:|---:|---|"]
    for f, c in self_c.most_common(top):
        out.append(f"| {100 * c / total:.1f} | {c * us:.0f} | `{f}` |")
    out += ["", "| inclusive % | µs/req | frame |", "|---:|---:|---|"]
    skip = ("<module>", "_run_code", "_run_module_as_main", "run (", "main (", "serve_main",
            "Runner.run")
    shown = 0
    for f, c in incl.most_common():
        if f.startswith(skip) or c >= recorded:
            continue
        out.append(f"| {100 * c / total:.1f} | {c * us:.0f} | `{f}` |")
        shown += 1
        if shown >= top:
            break
    return "\n".join(out)


def perf_by_dso(pid: int, seconds: float, workdir: Path) -> str:
    data = workdir / "perf.data"
    rec = subprocess.run(["perf", "record", "-F", "499", "-p", str(pid), "-o", str(data),
                          "--", "sleep", str(seconds)], capture_output=True, text=True)
    if rec.returncode != 0:
        return f"perf record failed: {rec.stderr.strip()[-300:]}"
    rep = subprocess.run(["perf", "report", "-i", str(data), "--sort", "dso", "--stdio",
                          "--percent-limit", "0.5"], capture_output=True, text=True)
    rows = [line.strip() for line in rep.stdout.splitlines()
            if line.strip() and not line.startswith("#")]
    return "perf, share of pdlb's CPU by binary:\n\n```\n" + "\n".join(rows[:15]) + "\n```"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=12.0)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--itl-ms", type=float, default=1.0)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--no-perf", action="store_true")
    p.add_argument("--access-log", choices=["off", "text", "json"],
                   help="run pdlb at --log-level info with [log] access off or on (text or"
                        " json lines, to its log file); default: --log-level warning, no table")
    p.add_argument("--pdlb-rev", metavar="REV",
                   help="profile pdlb as of git revision REV instead of the working tree")
    p.add_argument("--out", type=Path, default=cmp.BENCH / "results")
    args = p.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(cmp.dev_python()).parent / "py-spy")
    if not Path(pyspy).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    version = cmp.pdlb_source(args.pdlb_rev).name if args.pdlb_rev else cmp.git_describe()
    report = [f"## pdlb profile — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
              "", f"- pdlb {version}; {os.cpu_count()} CPUs ({cmp.cpu_model()}); "
              f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
              f"- load: open loop {args.rate:g} req/s × {args.duration:g} s, /v1/completions "
              f"stream + include_usage, mock ITL {args.itl_ms:g} ms",
              f"- access log: {args.access_log or 'not configured (--log-level warning)'}"]
    with tempfile.TemporaryDirectory(prefix="pdlb-prof-") as tmp:
        workdir = Path(tmp)
        mock_proc = cmp.spawn("mock", [cmp.dev_python(), str(cmp.BENCH / "mock_backend.py"),
                                       "--itl-ms", str(args.itl_ms)], workdir,
                              stdout_pipe=True)
        try:
            assert mock_proc.popen.stdout is not None
            info = json.loads(mock_proc.popen.stdout.readline())
            pdlb = cmp.start_pdlb(info["prefill"], info["decode"], workdir, args)
            try:
                direct = ["--direct", info["prefill"], info["decode"]]
                report += profile(pdlb, args, pyspy, workdir, direct)
                report += ttft_breakdown(pdlb, direct, args)
            finally:
                pdlb.stop()
        finally:
            mock_proc.stop()
    text = "\n".join(report) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.md"
    path.write_text(text)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _rate(url: str, tokens: int, args: argparse.Namespace, pids: list[int]
          ) -> tuple[float, dict[str, object]]:
    c0 = cmp.tree_cpu(pids)
    r = cmp.run_client("rate", ["--url", url], ["--tokens", str(tokens), "--rate",
                                                str(args.rate), "--duration",
                                                str(args.duration)], args.duration + 120)
    cpu = cmp.tree_cpu(pids) - c0
    return cpu * 1000 / max(1, int(r["ok"])), r


STAGES = {
    "pdlb_ttft_seconds": "pdlb's own TTFT: handler start → first event written",
    "pdlb_tokenize_duration_seconds": "token counting",
    "pdlb_prefill_duration_seconds": "prefill leg: request sent → answer read and parsed",
    "pdlb_handoff_duration_seconds": "decode leg: request sent → response headers",
}


def _histogram_sums(url: str) -> dict[str, tuple[float, float]]:
    """name -> (sum, count) over all label sets, for the histograms in STAGES."""
    _, raw = cmp.http_call(url + "/metrics")
    out: dict[str, list[float]] = {name: [0.0, 0.0] for name in STAGES}
    for line in raw.decode().splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        base = name.split("{", 1)[0]
        for stage in STAGES:
            if base == stage + "_sum":
                out[stage][0] += float(value)
            elif base == stage + "_count":
                out[stage][1] += float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def ttft_breakdown(pdlb: cmp.Started, direct: list[str], args: argparse.Namespace
                   ) -> list[str]:
    """Concurrency 1, proxy and direct interleaved; pdlb's stage histograms over the run."""
    before = _histogram_sums(pdlb.url)
    r = cmp.run_client("latency", ["--url", pdlb.url, *direct],
                       ["--n", "200", "--warmup", "20", "--tokens", str(args.tokens)], 600)
    after = _histogram_sums(pdlb.url)
    d = r["direct"]
    out = ["", "TTFT at concurrency 1 (200 requests, interleaved with the direct path):", "",
           "| | ms |", "|---|---:|",
           f"| client-seen TTFT p50 through pdlb | {r['ttft_ms']['p50']:.3f} |",
           f"| client-seen TTFT p50 direct (prefill + decode from the client) | "
           f"{d['ttft_ms']['p50']:.3f} |",
           f"| added by pdlb (p50 − p50) | {r['ttft_ms']['p50'] - d['ttft_ms']['p50']:+.3f} |"]
    for stage, label in STAGES.items():
        total, count = (after[stage][0] - before[stage][0], after[stage][1] - before[stage][1])
        if count:
            out.append(f"| mean {label} | {total / count * 1000:.3f} |")
    return out


def profile(pdlb: cmp.Started, args: argparse.Namespace, pyspy: str, workdir: Path,
            direct: list[str]) -> list[str]:
    pids = pdlb.pids()
    cmp.run_client("latency", ["--url", pdlb.url], ["--n", "20", "--warmup", "20"], 120)
    per64, r64 = _rate(pdlb.url, args.tokens, args, pids)
    per8, _ = _rate(pdlb.url, 8, args, pids)
    marginal = (per64 - per8) * 1000 / (args.tokens - 8)
    out = [f"- unprofiled: {per64:.3f} ms CPU/request at {args.tokens} tokens "
           f"({per64 * 1000 / args.tokens:.1f} µs/chunk if divided), {per8:.3f} ms at 8 tokens "
           f"→ marginal {marginal:.1f} µs/chunk, fixed {per64 - args.tokens * marginal / 1000:.3f}"
           f" ms/request; {r64['ok']} ok, {r64['errors']} errors", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / f"profile-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.pyspy-collapsed.txt"
    spy = subprocess.Popen([pyspy, "record", "-r", str(SAMPLE_HZ), "--nonblocking", "-f", "raw",
                            "-o", str(raw),
                            "--pid", str(pids[0]), "-d", str(int(args.duration) + 1)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    c0 = cmp.tree_cpu(pids)
    r = cmp.run_client("rate", ["--url", pdlb.url], ["--tokens", str(args.tokens), "--rate",
                                                     str(args.rate), "--duration",
                                                     str(args.duration)],
                       args.duration + 120)
    spy.wait(timeout=60)
    ok = max(1, int(r["ok"]))
    samples = sum(int(line.rpartition(" ")[2]) for line in raw.read_text().splitlines()
                  if line.rpartition(" ")[2].isdigit()) if raw.exists() else 0
    cpu_s = cmp.tree_cpu(pids) - c0
    out.append(f"- under py-spy ({SAMPLE_HZ} Hz, nonblocking): {cpu_s * 1000 / ok:.3f} ms "
               "CPU/request")
    out.append("")
    if samples:
        out.append(summarise_pyspy(raw, per64 * 1000, args.top, cpu_s * SAMPLE_HZ))
    if not args.no_perf and shutil.which("perf"):
        client = subprocess.Popen(
            [cmp.dev_python(), str(cmp.BENCH / "client.py"), "rate", "--url", pdlb.url,
             "--tokens", str(args.tokens), "--rate", str(args.rate), "--duration",
             str(args.duration)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        out += ["", perf_by_dso(pids[0], max(2.0, args.duration - 2), workdir)]
        client.wait(timeout=args.duration + 120)
    return out


if __name__ == "__main__":
    sys.exit(main())
