"""A client that pipelines requests and never reads the answers, against both fronts.

    .venv/bin/python bench/front_flood.py                # both fronts, ~1-2 min
    .venv/bin/python bench/front_flood.py --front fast   # only pdlb's own front

For each front (``fast_front = true``: lb/serve/front.py; ``false``: aiohttp's server) a
fresh ``pdlb serve`` runs as its own process in front of bench/mock_backend.py, and:

* **burst**: one connection sends ``POST /v1/completions`` with a 1-byte body (``{``, a
  400 each) 258,000 times (16 MB) in one go and never reads. Printed: the bytes the kernel
  accepted before ``send()`` blocked for ``--stall-s`` (pdlb's socket buffers plus what
  pdlb itself read), pdlb's RSS growth, and the CPU pdlb burned meanwhile.
* **flood**: the same request sent without end (until ``--flood-mb`` or a stall), paced
  in 64 KiB writes; the same figures.
* **latency**: another client's ordinary request (keep-alive, non-streamed), median and
  worst of ``--probes``, before the flood and while the flooding connection is open.

Everything is loopback; the flood is bounded in bytes and time. Numbers depend on the
machine (kernel socket buffers above all): compare the two fronts within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ONE = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n{"
BODY = b'{"model": "mock", "prompt": "hello", "max_tokens": 2}'
PROBE = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
         b"Content-Length: %d\r\n\r\n%b" % (len(BODY), BODY))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_pdlb(mock: dict[str, str], fast_front: bool) -> tuple[subprocess.Popen[str], str]:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as cfg:
        cfg.write(f'[server]\nport = 0\nfast_front = {"true" if fast_front else "false"}\n'
                  f'[pools.prefill]\nbackends = [{{ url = "{mock["prefill"]}" }}]\n'
                  f'[pools.decode]\nbackends = [{{ url = "{mock["decode"]}" }}]\n')
    proc = subprocess.Popen([sys.executable, "-m", "lb.cli", "serve", "--config", cfg.name,
                             "--log-level", "error"], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"pdlb did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[1].strip()


def address(url: str) -> tuple[str, int]:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def read_response(sock: socket.socket, buf: bytearray) -> None:
    """One whole Content-Length answer (the probe's are never chunked)."""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += sock.recv(65536)
    buf[:] = rest[length:]


def probe_latencies(url: str, n: int, gap_s: float) -> list[float]:
    sock = socket.create_connection(address(url), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    out = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            sock.sendall(PROBE)
            read_response(sock, buf)
            out.append(time.perf_counter() - t)
            time.sleep(gap_s)
    except (TimeoutError, OSError):
        out.append(float("inf"))
    finally:
        sock.close()
    return out


def flood(url: str, total: int, piece: int, stall_s: float, pace_s: float) -> tuple[int, float]:
    """Send up to ``total`` bytes of pipelined requests, never reading; stop when one send
    makes no progress for ``stall_s``. Returns the bytes accepted and the seconds taken."""
    sock = socket.create_connection(address(url))
    sock.settimeout(stall_s)
    chunk = ONE * (piece // len(ONE))
    sent = 0
    start = time.perf_counter()
    try:
        while sent < total:
            view = memoryview(chunk)
            while view:
                n = sock.send(view)
                sent += n
                view = view[n:]
            if pace_s:
                time.sleep(pace_s)
    except (TimeoutError, OSError):
        pass
    took = time.perf_counter() - start
    flood_socks.append(sock)  # left open, unread, until the case ends
    return sent, took


flood_socks: list[socket.socket] = []


def case(name: str, url: str, pid: int, total: int, piece: int, pace_s: float,
         args: argparse.Namespace) -> dict[str, object]:
    rss0, cpu0 = rss_kib(pid), cpu_s(pid)
    peak = [rss0]
    result: dict[str, object] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib(pid))
            time.sleep(0.05)

    def run_flood() -> None:
        result["accepted"], result["took"] = flood(url, total, piece, args.stall_s, pace_s)

    sampler = threading.Thread(target=sample)
    sampler.start()
    sender = threading.Thread(target=run_flood)
    sender.start()
    time.sleep(0.5)
    during: list[float] = []
    while len(during) < args.probes or sender.is_alive():  # probes for as long as it sends
        during += probe_latencies(url, 5, 0.05)
    sender.join()
    done.set()
    sampler.join()
    rss1, cpu1 = rss_kib(pid), cpu_s(pid)
    for sock in flood_socks:
        sock.close()
    flood_socks.clear()
    time.sleep(1.0)
    return {"case": name, "accepted_mb": round(int(result["accepted"]) / 1e6, 2),  # type: ignore[call-overload]
            "send_s": round(float(result["took"]), 1),  # type: ignore[arg-type]
            "rss_growth_mb": round((peak[0] - rss0) / 1024, 1),
            "rss_after_mb": round((rss1 - rss0) / 1024, 1),
            "pdlb_cpu_s": round(cpu1 - cpu0, 2),
            "probe_median_ms": round(statistics.median(during) * 1000, 2),
            "probe_max_ms": round(max(during) * 1000, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--front", choices=["fast", "aiohttp", "both"], default="both")
    p.add_argument("--flood-mb", type=float, default=200.0)
    p.add_argument("--stall-s", type=float, default=3.0)
    p.add_argument("--probes", type=int, default=20)
    args = p.parse_args(argv)
    mock_proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "mock_backend.py"),
                                  "--itl-ms", "0"], stdout=subprocess.PIPE, text=True)
    assert mock_proc.stdout is not None
    mock = json.loads(mock_proc.stdout.readline())
    fronts = {"fast": [True], "aiohttp": [False], "both": [True, False]}[args.front]
    try:
        for fast in fronts:
            proc, url = start_pdlb(mock, fast)
            try:
                time.sleep(0.5)
                base = probe_latencies(url, args.probes, 0.02)
                front = "fast_front=true " if fast else "fast_front=false"
                print(f"{front} idle probe: median {statistics.median(base) * 1000:.2f} ms, "
                      f"max {max(base) * 1000:.2f} ms", flush=True)
                for row in (
                    case("burst 16 MB", url, proc.pid, len(ONE) * 258_000, 1 << 20, 0.0, args),
                    case(f"flood {args.flood_mb:g} MB", url, proc.pid,
                         int(args.flood_mb * 1e6), 1 << 16, 0.001, args),
                ):
                    print(f"{front} " + json.dumps(row), flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
    finally:
        mock_proc.terminate()
        mock_proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
