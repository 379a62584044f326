"""pdlb against the other PD front doors, side by side, on a fast mock backend — one command.

    .venv/bin/python bench/compare.py                 # everything, twice (~8-10 min)
    .venv/bin/python bench/compare.py --runs 1 --proxies pdlb,vllm-router --quick
    .venv/bin/python bench/compare.py --pdlb-workers 2   # + `pdlb serve --workers 2`
    .venv/bin/python bench/compare.py --proxies pdlb,pdlb@HEAD~5 --runs 1   # A/B two pdlbs

What it does:

1. Installs the peers into a scratch virtualenv, ``.cache/bench-venv`` (idempotent; pinned:
   vllm-router, sglang-router, and FastAPI/uvicorn/httpx for the Python proxies). vLLM's
   reference NIXL proxy (``toy_proxy_server.py``) is not in any wheel: it is used when a copy
   is at ``.cache/bench-peers/toy_proxy_server.py`` (or ``--toy-proxy PATH``), else skipped.
2. Starts bench/mock_backend.py (a prefill and a decode mock in one uvloop process).
3. Measures the direct path (no proxy: the client runs the prefill leg, then the decode
   stream, itself), then each proxy in turn, started fresh: idle CPU, latency at
   concurrency 1, CPU at a fixed open-loop rate with 64-token and with 8-token streams, and
   max throughput at concurrency 64.
4. Prints one markdown table per run and writes everything to
   ``bench/results/compare-<UTC time>.{md,json}``.

Definitions (also printed under each table):

* added TTFT / E2E pXX = the proxy's pXX minus the direct path's pXX at concurrency 1,
  measured interleaved (proxy request, direct request, alternating, same client process),
  so machine noise hits both alike. TTFT = until the first SSE ``data:`` bytes of the
  answer; E2E = until its last byte. The direct row shows absolute values.
* CPU ms/req = the proxy process tree's CPU time (/proc/PID/task/*/schedstat, every
  thread) during the open-loop run with 64-token streams ÷ requests completed.
  µs/chunk = that ÷ 64 (how the issue quotes it). "marginal µs/chunk" = (CPU/req at 64
  tokens − CPU/req at 8 tokens) ÷ 56, and "fixed ms/req" = CPU/req at 64 − 64 × marginal:
  the split between per-request and per-chunk work.
* max req/s = requests completed correctly per second at concurrency 64 (closed loop), with
  the mock streaming as fast as it can (ITL 0, still one write per event). Client, mock and
  proxy share this machine's 2 cores; the direct row shows the ceiling the client and mock
  allow by themselves.
* correct: every response had all 64 tokens in order, ``[DONE]`` last, a usage event with
  the right counts, and the decode got the KV handoff (NIXL params issued by the prefill, or
  SGLang bootstrap fields whose room the prefill also saw). "cached" says whether
  ``usage.prompt_tokens_details.cached_tokens`` was the truth (the prefill's 0) or the
  decode's figure (its prompt length: vLLM counts pulled KV as cached).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = ROOT / ".cache"
VENV = CACHE / "bench-venv"
TOY_DEFAULT = CACHE / "bench-peers" / "toy_proxy_server.py"
PEER_REQUIREMENTS = [
    "vllm-router==0.1.17",
    "sglang-router==0.3.2",
    "fastapi", "uvicorn", "httpx", "aiohttp", "orjson", "uvloop", "setproctitle",
]
ALL_PROXIES = ["pdlb", "vllm-router", "sglang-router", "toy-proxy", "mini-lb"]
PYTHON_PROXIES = ("toy-proxy", "mini-lb")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- environment
def dev_python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def ensure_peer_venv() -> None:
    """Create .cache/bench-venv with the peers, unless it already has exactly these pins."""
    marker = VENV / ".bench-requirements"
    wanted = "\n".join(PEER_REQUIREMENTS)
    if marker.exists() and marker.read_text() == wanted:
        return
    log(f"installing peers into {VENV} (one time, ~1 min)")
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", *PEER_REQUIREMENTS], check=True)
    marker.write_text(wanted)


def peer_versions() -> dict[str, str]:
    code = ("import importlib.metadata as m, json\n"
            "out = {}\n"
            "for d in ('vllm-router', 'sglang-router', 'fastapi', 'uvicorn', 'httpx',"
            " 'aiohttp'):\n"
            "    try: out[d] = m.version(d)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    try:
        out = subprocess.run([str(VENV / "bin" / "python"), "-c", code], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        versions: dict[str, str] = json.loads(out)
    except (subprocess.SubprocessError, ValueError, OSError):
        versions = {}
    return versions


def git_describe() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lb", "policies"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty(lb/policies)" if dirty else "")
    except (subprocess.SubprocessError, OSError):
        return "unknown"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ----------------------------------------------------------------------------- /proc
def _task_ns(pid: int) -> int:
    """Nanoseconds on CPU of every live thread of ``pid`` (/proc/PID/task/*/schedstat)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds used so far by these processes and all their descendants (ns-resolution
    schedstat of each live thread; the benchmarked servers keep their threads alive)."""
    children = _children()
    total = 0
    seen = set()
    stack = list(pids)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _task_ns(pid)
        stack.extend(children.get(pid, ()))
    return total / 1e9


# ----------------------------------------------------------------------------- processes
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=8)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)


def spawn(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None,
          stdout_pipe: bool = False, cwd: Path = ROOT) -> Proc:
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as logf:  # the child keeps its own copy of the descriptor
        popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE if stdout_pipe else logf, stderr=logf,
            stdin=subprocess.DEVNULL, cwd=cwd, env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    return Proc(name, popen, log_path)


def http_call(url: str, method: str = "GET", body: bytes | None = None,
              timeout: float = 5.0) -> tuple[int, bytes]:
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    path = "/" + url.split("//", 1)[1].split("/", 1)[1] if url.count("/") > 2 else "/"
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body,
                     headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(proc: Proc, base: str, timeout: float = 90.0) -> None:
    """Until a small non-streamed completion goes through the proxy."""
    body = json.dumps({"model": "mock", "prompt": "ready?", "max_tokens": 2}).encode()
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}); see "
                               f"{proc.log_path}:\n{proc.log_path.read_text()[-2000:]}")
        try:
            status, data = http_call(base + "/v1/completions", "POST", body, timeout=5)
            if status == 200 and b"choices" in data:
                return
            last = f"HTTP {status}: {data[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.3)
    raise RuntimeError(f"{proc.name} not ready after {timeout:g} s: {last}")


# ----------------------------------------------------------------------------- the proxies
@dataclass
class Started:
    procs: list[Proc]
    url: str

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


ProxyStarter = Callable[[str, str, Path, argparse.Namespace], Started]


def _hostport(url: str) -> tuple[str, int]:
    host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    return host, int(port)


def pdlb_source(rev: str) -> Path:
    """lb/ and policies/ of git revision ``rev``, exported once under .cache/pdlb-rev/."""
    sha = subprocess.run(["git", "rev-parse", "--short=12", rev], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    dest = CACHE / "pdlb-rev" / sha
    if not (dest / "lb" / "cli.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha, "lb", "policies"], cwd=ROOT,
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def start_pdlb(prefill: str, decode: str, workdir: Path, args: argparse.Namespace,
               workers: int = 1, rev: str | None = None) -> Started:
    cfg = workdir / "pdlb.toml"
    cfg.write_text(
        "[server]\nhost = \"127.0.0.1\"\nport = 0\n"
        f"[pools.prefill]\nbackends = [\"{prefill}\"]\n"
        f"[pools.decode]\nbackends = [\"{decode}\"]\n"
    )
    log_level = "warning"
    access_log = getattr(args, "access_log", None)
    if access_log is not None:  # at INFO, so that only [log] access differs between runs
        log_level = "info"
        with cfg.open("a") as f:
            f.write(f"[log]\naccess = {'false' if access_log == 'off' else 'true'}\n"
                    f"format = \"{'json' if access_log == 'json' else 'text'}\"\n")
    if getattr(args, "pdlb_tracing", None) == "on":  # every request traced, to the mock's sink
        with cfg.open("a") as f:
            f.write(f"[tracing]\nenabled = true\nendpoint = \"{decode}/v1/traces\"\n")
    argv = [dev_python(), "-m", "lb.cli", "serve", "--config", str(cfg), "--log-level",
            log_level]
    if workers > 1:
        argv += ["--workers", str(workers)]
    env = None
    cwd = ROOT
    rev = rev or getattr(args, "pdlb_rev", None)
    if rev:  # another pdlb from git: run in its folder (python -m puts the cwd first)
        cwd = pdlb_source(rev)
        env = {"PYTHONPATH": str(cwd)}
    p = spawn(f"pdlb{'@' + rev if rev else ''}", argv, workdir, env=env, stdout_pipe=True,
              cwd=cwd)
    assert p.popen.stdout is not None
    line = p.popen.stdout.readline().decode()
    found = re.search(r"listening on (\S+)", line)
    if not found:
        p.stop()
        raise RuntimeError(f"pdlb did not start: {line!r}; see {p.log_path}")
    url = found.group(1)
    wait_ready(p, url)
    return Started([p], url)


def start_vllm_router(prefill: str, decode: str, workdir: Path,
                      args: argparse.Namespace) -> Started:
    port = free_port()
    p = spawn("vllm-router", [
        str(VENV / "bin" / "vllm-router"), "--host", "127.0.0.1", "--port", str(port),
        "--vllm-pd-disaggregation", "--prefill", prefill, "--decode", decode,
        "--kv-connector", "nixl", "--policy", "round_robin",
        "--prometheus-port", str(free_port()), "--log-level", "warning",
        "--worker-startup-check-interval", "1",
    ], workdir)
    url = f"http://127.0.0.1:{port}"
    wait_ready(p, url)
    return Started([p], url)


def _sglang_argv(prefill: str, decode: str, port: int, mini: bool) -> list[str]:
    argv = [str(VENV / "bin" / "python"), "-m", "sglang_router.launch_router",
            "--host", "127.0.0.1", "--port", str(port), "--pd-disaggregation",
            "--prefill", prefill, "8998", "--decode", decode]
    if mini:
        return [*argv, "--mini-lb"]
    return [*argv, "--policy", "round_robin", "--prometheus-port", str(free_port()),
            "--log-level", "warn", "--worker-startup-check-interval", "1"]


def start_sglang_router(prefill: str, decode: str, workdir: Path,
                        args: argparse.Namespace) -> Started:
    port = free_port()
    p = spawn("sglang-router", _sglang_argv(prefill, decode, port, mini=False), workdir)
    url = f"http://127.0.0.1:{port}"
    wait_ready(p, url)
    return Started([p], url)


def start_mini_lb(prefill: str, decode: str, workdir: Path,
                  args: argparse.Namespace) -> Started:
    port = free_port()
    p = spawn("mini-lb", _sglang_argv(prefill, decode, port, mini=True), workdir)
    url = f"http://127.0.0.1:{port}"
    wait_ready(p, url)
    return Started([p], url)


def start_toy_proxy(prefill: str, decode: str, workdir: Path,
                    args: argparse.Namespace) -> Started:
    port = free_port()
    ph, pp = _hostport(prefill)
    dh, dp = _hostport(decode)
    p = spawn("toy-proxy", [
        str(VENV / "bin" / "python"), str(args.toy_proxy), "--host", "127.0.0.1",
        "--port", str(port), "--prefiller-host", ph, "--prefiller-port", str(pp),
        "--decoder-host", dh, "--decoder-port", str(dp),
    ], workdir)
    url = f"http://127.0.0.1:{port}"
    wait_ready(p, url)
    return Started([p], url)


STARTERS: dict[str, ProxyStarter] = {
    "pdlb": start_pdlb,
    "vllm-router": start_vllm_router,
    "sglang-router": start_sglang_router,
    "toy-proxy": start_toy_proxy,
    "mini-lb": start_mini_lb,
}
DESCRIPTIONS = {
    "pdlb": "pdlb (this repo; aiohttp + uvloop, NIXL pull)",
    "vllm-router": "vllm-router (Rust, --vllm-pd-disaggregation, NIXL pull)",
    "sglang-router": "sglang-router (Rust, --pd-disaggregation, SGLang bootstrap)",
    "toy-proxy": "vLLM toy_proxy_server.py (FastAPI + httpx, NIXL pull)",
    "mini-lb": "SGLang mini_lb (FastAPI + aiohttp, bootstrap; sglang-router --mini-lb)",
}


# ----------------------------------------------------------------------------- measuring
def run_client(mode: str, target: list[str], extra: list[str], timeout: float) -> dict[str, Any]:
    argv = [dev_python(), str(BENCH / "client.py"), mode, *target, *extra]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"client failed ({out.returncode}): {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@dataclass
class Measured:
    name: str
    idle_cpu_ms_per_s: float | None = None
    latency: dict[str, Any] = field(default_factory=dict)
    rate64: dict[str, Any] = field(default_factory=dict)
    rate8: dict[str, Any] = field(default_factory=dict)
    closed: dict[str, Any] = field(default_factory=dict)
    mock_stats: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)


def set_itl(mock: Started, itl_ms: float) -> None:
    http_call(mock.url + "/mock/config", "POST", json.dumps({"itl_ms": itl_ms}).encode())


def measure(name: str, target: list[str], pids: list[int], mock: Started,
            args: argparse.Namespace, direct: list[str]) -> Measured:
    m = Measured(name)
    m.loadavg = os.getloadavg()
    http_call(mock.url + "/mock/reset", "POST", b"{}")
    if pids:
        c0 = tree_cpu(pids)
        time.sleep(args.idle_s)
        m.idle_cpu_ms_per_s = (tree_cpu(pids) - c0) * 1000 / args.idle_s
    common = ["--tokens", str(args.tokens), "--endpoint", args.endpoint]
    both = target if target == direct else [*target, *direct]
    m.latency = run_client("latency", both,
                           [*common, "--n", str(args.latency_n), "--warmup", "20"],
                           timeout=600)
    for tokens, key in ((args.tokens, "rate64"), (8, "rate8")):
        c0, mc0 = tree_cpu(pids), tree_cpu(mock.pids())
        r = run_client("rate", target, ["--tokens", str(tokens), "--endpoint", args.endpoint,
                                        "--rate", str(args.rate),
                                        "--duration", str(args.duration)],
                       timeout=args.duration + 120)
        r["proxy_cpu_s"] = tree_cpu(pids) - c0
        r["mock_cpu_s"] = tree_cpu(mock.pids()) - mc0
        setattr(m, key, r)
    set_itl(mock, args.closed_itl_ms)
    try:
        c0, mc0 = tree_cpu(pids), tree_cpu(mock.pids())
        m.closed = run_client("closed", target, [*common, "--conc", str(args.conc),
                                                 "--duration", str(args.closed_duration)],
                              timeout=args.closed_duration + 120)
        m.closed["proxy_cpu_s"] = tree_cpu(pids) - c0
        m.closed["mock_cpu_s"] = tree_cpu(mock.pids()) - mc0
    finally:
        set_itl(mock, args.itl_ms)
    _, raw = http_call(mock.url + "/mock/stats")
    m.mock_stats = json.loads(raw)
    return m


# ----------------------------------------------------------------------------- reporting
def _f(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def cpu_per_req(r: dict[str, Any]) -> float | None:
    ok = r.get("ok") or 0
    if not ok or "proxy_cpu_s" not in r:
        return None
    return float(r["proxy_cpu_s"]) * 1000 / ok


def correctness(m: Measured, tokens: int) -> str:
    """One cell: ✓ when every checked response was right, else what went wrong."""
    tallies = [m.latency.get("tally", {}), m.rate64.get("tally", {}), m.closed.get("tally", {})]
    total = sum(t.get("ok", 0) + t.get("incorrect", 0) for t in tallies)
    if not total:
        return "no responses"
    problems = []
    for key, label in (("tokens_ok", "tokens"), ("done_ok", "[DONE]"), ("usage_ok", "usage")):
        got = sum(t.get(key, 0) for t in tallies)
        if got < total:
            problems.append(f"{label} {got}/{total}")
    kv = sum(t.get("kv_ok", 0) + t.get("kv_bootstrap", 0) for t in tallies)
    if kv < total:
        problems.append(f"kv {kv}/{total}")
    st = m.mock_stats
    if st.get("decode_bootstrap") and st.get("bootstrap_rooms_matched", 0) < st.get(
            "bootstrap_rooms_decode", 0):
        problems.append(f"rooms {st['bootstrap_rooms_matched']}/{st['bootstrap_rooms_decode']}")
    if st.get("decode_kv_bad"):
        problems.append(f"bad kv {st['decode_kv_bad']}")
    cached = sum(t.get("cached_true", 0) for t in tallies)
    cell = "✓" if not problems else "✗ " + ", ".join(problems)
    usage = sum(t.get("usage_ok", 0) for t in tallies)
    if usage:
        cell += "; cached ✓" if cached == usage else f"; cached ✗ ({cached}/{usage})"
    return cell


def errors(m: Measured) -> int:
    return sum(int(r.get("errors", 0)) + int(r.get("unfinished", 0))
               for r in (m.latency, m.rate64, m.rate8, m.closed))


def _added(lat: dict[str, Any], direct: dict[str, Any], kind: str, q: str) -> str:
    a, b = lat[kind][q], direct[kind][q]
    return "–" if a is None or b is None else f"{a - b:+.2f}"


def table(results: list[Measured], args: argparse.Namespace) -> str:
    direct = next((m for m in results if m.name == "direct"), None)
    head = ("| proxy | added TTFT p50 / p99 (ms) | added E2E p50 / p99 (ms) | CPU ms/req | "
            "µs/chunk (÷64) | marginal µs/chunk | fixed ms/req | max req/s @c64 | idle CPU "
            "ms/s | errors | correct |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for m in results:
        if m.error:
            rows.append(f"| {m.name} | failed: {m.error[:120]} |||||||||| ")
            continue
        lat = m.latency
        if m.name == "direct" or direct is None:
            ttft = (f"{_f(lat['ttft_ms']['p50'])} / {_f(lat['ttft_ms']['p99'])} (abs)")
            e2e = (f"{_f(lat['e2e_ms']['p50'], 1)} / {_f(lat['e2e_ms']['p99'], 1)} (abs)")
        else:
            d = lat.get("direct") or direct.latency
            ttft = f"{_added(lat, d, 'ttft_ms', 'p50')} / {_added(lat, d, 'ttft_ms', 'p99')}"
            e2e = f"{_added(lat, d, 'e2e_ms', 'p50')} / {_added(lat, d, 'e2e_ms', 'p99')}"
        c64, c8 = cpu_per_req(m.rate64), cpu_per_req(m.rate8)
        per_chunk = None if c64 is None else c64 * 1000 / args.tokens
        marginal = fixed = None
        if c64 is not None and c8 is not None and args.tokens > 8:
            marginal = (c64 - c8) * 1000 / (args.tokens - 8)
            fixed = c64 - args.tokens * marginal / 1000
        if m.name == "direct":
            cpu_cells = "(none) | | | "
        else:
            cpu_cells = f"{_f(c64, 3)} | {_f(per_chunk, 1)} | {_f(marginal, 1)} | {_f(fixed, 3)}"
        rows.append(
            f"| {m.name} | {ttft} | {e2e} | {cpu_cells} | {_f(m.closed.get('rps'), 0)} | "
            f"{_f(m.idle_cpu_ms_per_s, 1)} | {errors(m)} | {correctness(m, args.tokens)} |")
    return "\n".join(rows)


def side_notes(results: list[Measured], args: argparse.Namespace) -> str:
    lines = []
    for m in results:
        if m.error:
            continue
        r = m.rate64
        mock_ms = r.get("mock_cpu_s", 0) * 1000 / max(1, r.get("ok", 0))
        cl = m.closed
        lines.append(
            f"- {m.name}: load avg {m.loadavg[0]:.2f} at start; open loop {r.get('ok')} ok of "
            f"{args.rate:g}/s × {args.duration:g} s, client lag p99 "
            f"{_f(r.get('lag_ms', {}).get('p99'), 1)} ms, TTFT p50/p99 under load "
            f"{_f(r['ttft_ms']['p50'])}/{_f(r['ttft_ms']['p99'])} ms; mock CPU "
            f"{mock_ms:.3f} ms/req; c64: proxy {cl.get('proxy_cpu_s', 0):.2f} s + mock "
            f"{cl.get('mock_cpu_s', 0):.2f} s + client {cl.get('client_cpu_s', 0):.2f} s CPU "
            f"in {cl.get('wall_s', 0):.1f} s")
        if any(k.startswith("404") for k in m.mock_stats):
            lines.append(f"  mock saw unknown routes: "
                         f"{ {k: v for k, v in m.mock_stats.items() if k.startswith('404')} }")
    return "\n".join(lines)


def ratios(results: list[Measured], args: argparse.Namespace) -> str:
    by = {m.name: m for m in results if not m.error}
    direct = by.get("direct")
    out = []
    if "pdlb" not in by or direct is None:
        return ""
    p = by["pdlb"]

    def added_ttft(m: Measured) -> float | None:
        d = m.latency.get("direct") or direct.latency
        a, b = m.latency["ttft_ms"]["p50"], d["ttft_ms"]["p50"]
        return None if a is None or b is None else a - b

    for peer in ["vllm-router", "sglang-router", *PYTHON_PROXIES]:
        if peer not in by:
            continue
        q = by[peer]
        pc, qc = cpu_per_req(p.rate64), cpu_per_req(q.rate64)
        pt, qt = added_ttft(p), added_ttft(q)
        cpu_r = f"{pc / qc:.2f}x" if pc and qc else "–"
        ttft_r = f"{pt / qt:.2f}x" if pt and qt and qt > 0 else "–"
        out.append(f"- pdlb / {peer}: CPU per request (and per chunk) {cpu_r}; "
                   f"added TTFT p50 {ttft_r}")
    return "\n".join(out)


def noise(runs: list[list[Measured]]) -> str:
    """How much each proxy's numbers moved between runs (the only honest error bar here)."""
    if len(runs) < 2:
        return "Noise: one run only; run at least twice to see it."
    lines = ["### Noise between runs", "",
             "| proxy | CPU ms/req (min–max, spread) | added TTFT p50 ms (min–max) |",
             "|---|---|---|"]
    names = [m.name for m in runs[0] if m.name != "direct"]
    for name in names:
        cpus, ttfts = [], []
        for run in runs:
            by = {m.name: m for m in run}
            m, d = by.get(name), by.get("direct")
            if m is None or m.error:
                continue
            c = cpu_per_req(m.rate64)
            if c is not None:
                cpus.append(c)
            base = m.latency.get("direct") or (d.latency if d else None)
            a = m.latency.get("ttft_ms", {}).get("p50")
            if base is not None and a is not None and base["ttft_ms"]["p50"] is not None:
                ttfts.append(a - base["ttft_ms"]["p50"])
        if not cpus:
            continue
        spread = (max(cpus) - min(cpus)) / min(cpus) * 100
        ttft = f"{min(ttfts):+.2f} – {max(ttfts):+.2f}" if ttfts else "–"
        lines.append(f"| {name} | {min(cpus):.3f} – {max(cpus):.3f} ({spread:.0f}%) | {ttft} |")
    return "\n".join(lines)


def render_run(i: int, results: list[Measured], args: argparse.Namespace) -> str:
    return (f"### Run {i}\n\n{table(results, args)}\n\n{ratios(results, args)}\n\n"
            f"<details><summary>run {i} details</summary>\n\n"
            f"{side_notes(results, args)}\n\n</details>\n")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proxies", default=",".join(ALL_PROXIES),
                   help=f"comma list among {', '.join(ALL_PROXIES)}; pdlb@REV runs pdlb's "
                        "lb/ and policies/ as of git revision REV (A/B a change in one run)")
    p.add_argument("--runs", type=int, default=2, help="full passes (noise = their spread)")
    p.add_argument("--pdlb-rev", metavar="REV",
                   help="run pdlb (and its --workers rows) from git revision REV instead of "
                        "the working tree (measure a commit while lb/ is being edited)")
    p.add_argument("--pdlb-workers", default="",
                   help="also run `pdlb serve --workers N` (SO_REUSEPORT), e.g. '2' or '2,3'")
    p.add_argument("--pdlb-tracing", choices=["off", "on"], default="off",
                   help="on: pdlb (and pdlb@REV) trace every request ([tracing], OTLP/HTTP "
                        "to the mock's sink; needs pdlb[otel])")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--itl-ms", type=float, default=1.0, help="mock: time between tokens")
    p.add_argument("--rate", type=float, default=100.0, help="open-loop requests/s")
    p.add_argument("--duration", type=float, default=8.0, help="open-loop seconds per run")
    p.add_argument("--latency-n", type=int, default=100, help="requests at concurrency 1")
    p.add_argument("--conc", type=int, default=64)
    p.add_argument("--closed-duration", type=float, default=6.0)
    p.add_argument("--closed-itl-ms", type=float, default=0.0,
                   help="mock ITL during the closed-loop run (0: CPU-bound throughput)")
    p.add_argument("--idle-s", type=float, default=5.0)
    p.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    p.add_argument("--toy-proxy", type=Path, default=TOY_DEFAULT,
                   help="vLLM's tests/v1/kv_connector/nixl_integration/toy_proxy_server.py")
    p.add_argument("--out", type=Path, default=BENCH / "results")
    p.add_argument("--skip-install", action="store_true")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only re-print the tables and noise of a saved compare-*.json")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        runs = [[Measured(**m) for m in run] for run in saved["runs"]]
        print("\n".join(saved["header"]) + "\n")
        for i, run in enumerate(runs, 1):
            print(render_run(i, run, args))
        print(noise(runs))
        return 0
    if args.quick:
        args.duration, args.latency_n, args.closed_duration, args.idle_s = 3.0, 40, 3.0, 1.0

    names = [n.strip() for n in args.proxies.split(",") if n.strip()]
    unknown = [n for n in names if n not in STARTERS and not n.startswith("pdlb@")]
    if unknown:
        p.error(f"unknown proxies: {unknown}")
    skipped: dict[str, str] = {}
    if any(n != "pdlb" for n in names) and not args.skip_install:
        ensure_peer_venv()
    if "toy-proxy" in names and not args.toy_proxy.exists():
        skipped["toy-proxy"] = (
            f"{args.toy_proxy} not found: vLLM ships toy_proxy_server.py in its source "
            "tree only (tests/v1/kv_connector/nixl_integration/), not in a wheel; copy it "
            "there to include it")
        names.remove("toy-proxy")
    for w in (int(x) for x in args.pdlb_workers.split(",") if x.strip()):
        names.append(f"pdlb --workers {w}")

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    header = [
        f"## pdlb vs peers — {stamp} UTC",
        "",
        f"- machine: {os.cpu_count()} CPUs ({cpu_model()}), Python "
        f"{platform.python_version()}, pdlb "
        f"{pdlb_source(args.pdlb_rev).name if args.pdlb_rev else git_describe()}",
        f"- peers: {json.dumps(peer_versions()) if any(n != 'pdlb' for n in names) else '-'}",
        f"- workload: /v1/{'completions' if args.endpoint == 'completions' else 'chat/completions'}"
        f" stream, include_usage, {args.tokens} tokens, mock ITL {args.itl_ms:g} ms; latency "
        f"{args.latency_n} req at c=1; open loop {args.rate:g} req/s × {args.duration:g} s "
        f"(and 8-token streams, same rate); closed loop c={args.conc} for "
        f"{args.closed_duration:g} s at mock ITL {args.closed_itl_ms:g} ms",
        f"- load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]
    for name, why in skipped.items():
        header.append(f"- skipped {name}: {why}")
    log("\n".join(header))
    runs: list[list[Measured]] = []
    with tempfile.TemporaryDirectory(prefix="pdlb-bench-") as tmp:
        workdir = Path(tmp)
        for i in range(1, args.runs + 1):
            runs.append(_run_with_mock(i, names, args, workdir))
            print(render_run(i, runs[-1], args), flush=True)
    print(noise(runs), flush=True)
    header.append(f"- load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    doc = "\n".join(header) + "\n\n" + "\n".join(
        render_run(i, r, args) for i, r in enumerate(runs, 1)) + "\n" + noise(runs) + "\n" + (
        __doc__.split("Definitions (also printed under each table):", 1)[1])
    md = args.out / f"compare-{stamp}.md"
    md.write_text(doc)
    (args.out / f"compare-{stamp}.json").write_text(json.dumps(
        {"header": header, "args": {k: str(v) for k, v in vars(args).items()},
         "runs": [[vars(m) for m in r] for r in runs]}, indent=1, default=str))
    log(f"wrote {md}")
    return 0


def _run_with_mock(i: int, names: list[str], args: argparse.Namespace, workdir: Path
                   ) -> list[Measured]:
    p = spawn("mock", [dev_python(), str(BENCH / "mock_backend.py"), "--itl-ms",
                       str(args.itl_ms)], workdir, stdout_pipe=True)
    try:
        assert p.popen.stdout is not None
        info = json.loads(p.popen.stdout.readline())
        mock = Started([p], info["decode"])
        prefill, decode = info["prefill"], info["decode"]
        results = [measure_direct(i, prefill, decode, mock, args)]
        for name in names:
            results.append(measure_proxy(i, name, prefill, decode, mock, args, workdir))
        return results
    finally:
        p.stop()


def measure_direct(i: int, prefill: str, decode: str, mock: Started,
                   args: argparse.Namespace) -> Measured:
    log(f"run {i}: direct path (no proxy)")
    target = ["--direct", prefill, decode]
    return measure("direct", target, [], mock, args, target)


def measure_proxy(i: int, name: str, prefill: str, decode: str, mock: Started,
                  args: argparse.Namespace, workdir: Path) -> Measured:
    log(f"run {i}: {name} (load avg {os.getloadavg()[0]:.2f})")
    try:
        if name.startswith("pdlb --workers"):
            workers = int(name.rsplit(" ", 1)[1])
            started = start_pdlb(prefill, decode, workdir, args, workers=workers)
        elif name.startswith("pdlb@"):
            started = start_pdlb(prefill, decode, workdir, args, rev=name[5:])
        else:
            started = STARTERS[name](prefill, decode, workdir, args)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        log(f"{name}: could not start: {exc}")
        return Measured(name, error=str(exc).splitlines()[0])
    try:
        return measure(name, ["--url", started.url], started.pids(), mock, args,
                       ["--direct", prefill, decode])
    except (RuntimeError, subprocess.SubprocessError, OSError, ValueError) as exc:
        log(f"{name}: measurement failed: {exc}")
        return Measured(name, error=str(exc).splitlines()[0])
    finally:
        started.stop()


if __name__ == "__main__":
    sys.exit(main())
