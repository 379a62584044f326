"""Does the prefill routing policy matter? Compare policies on emulated PD pools.

Starts 4 prefill + 4 decode emulated vLLM servers (``emulator``, one process each), then for
every policy: resets the emulators (empty prefix caches), starts pdlb in its own process
with that policy on the prefill pool (decode: ``least_tokens`` throughout), and drives a
shared-prefix workload with the load generator (``loadgen``: N system prompts, each shared
by many questions, Poisson arrivals). While it runs, pdlb's ``/metrics`` is sampled every
100 ms for the per-backend in-flight tokens. Printed per policy:

* prefix-cache hit rate of the prefill pool: Δ ``vllm:prefix_cache_hits`` / Δ
  ``vllm:prefix_cache_queries``, summed over the prefill emulators;
* TTFT p50 / p99 (loadgen, vLLM ``bench serve`` definitions);
* load imbalance: max / mean of ``pdlb_backend_inflight_tokens`` across a pool's backends,
  as Σ max / Σ mean over the samples (1.00 = perfectly even; 4.00 = all on one of four),
  prefill and decode;
* the load generator's p99 schedule lag: above a few ms the machine was starved of CPU
  during that run (other work on it), and its latencies say more about that than about the
  policy — rerun it.

The prefix working set (groups × prefix tokens) is made larger than one prefill server's
KV cache but smaller than the four together: the case where routing decides whether the
caches hold the prefixes at all.

    python bench/policies.py                      # ~100 s: 4 policies × 20 s + start-up
    python bench/policies.py --duration 10 --policies round_robin,prefix_affinity

``--scenario multitenant`` (KV-event routing, ``kv_aware``): the same 4 + 4 emulators, each
also publishing vLLM's KV-cache events on its own loopback port (pdlb discovers them through
``/kv_event_sources``), with KV caches of ``--prefill-kv-tokens`` / ``--decode-kv-tokens``.
The workload is generated here (one trace, the same for every run): ``--tenants`` tenants,
each with a shared prefix (a system prompt / document) of a length drawn from
``--prefix-range``, Zipf(``--tenant-skew``) tenant popularity, a unique question of
``--question-range`` tokens per request, Poisson arrivals at ``--rate`` for ``--duration``
seconds (at most ``--max-requests``). For every ``--replicas`` count R, every prefill policy
runs behind R pdlb processes with the same config (``[tokenizer] kind = "emulator"``,
``[kv_events] enabled``, decode ``least_tokens``; plus one run with ``kv_aware`` on both
pools unless ``--no-kv-decode``); request i goes to replica i mod R (one loadgen trace
replay per replica). Before each run the emulators are reset once every replica follows
their events, so each replica starts from empty, known caches. Printed per (policy,
replicas), besides what the default scenario prints (TTFT p50/p90 here):

* fleet hit rate: 1 - prompt tokens computed by all 8 emulators
  (``vllm:prompt_tokens_by_source{source="local_compute"}``) / prompt tokens sent — the
  same as the prefill hit rate unless a decode served requests alone;
* pdlb's predictions (summed over replicas): the share of predicted prefill legs whose
  cached tokens matched what the prefill reported exactly (``pdlb_kv_predictions_total``),
  and the mean |predicted - reported| (``pdlb_kv_prediction_error_tokens`` sum / count);
* the share of KV-aware picks resting on events rather than the approximate index
  (``pdlb_kv_route_picks_total``), and prefill hops skipped (``pdlb_kv_skipped_prefill``);
* a "best possible" line: the hit rate of an infinite cache that every request reaches —
  each tenant's prefix cached from its second request on (in full 16-token blocks, the
  last token of a prompt never counted, as vLLM and the emulator do).

    python bench/policies.py --scenario multitenant             # ~6 min: 10 runs × 25 s
    python bench/policies.py --scenario multitenant --replicas 3 --policies score,kv_aware
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp

DEFAULT_POLICIES = "round_robin,least_tokens,prefix_affinity,score"
MULTITENANT_POLICIES = "round_robin,prefix_affinity,score,kv_aware"
_SAMPLE = re.compile(r'^([\w:]+)(?:\{([^}]*)\})? ([0-9.eE+-]+|NaN|[+-]Inf)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')
ADMIN_TOKEN = "bench-policies"  # pdlb's /admin on loopback, for --state-dir


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    a, b = int(lo), int(hi or lo)
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MIN:MAX with 1 <= MIN <= MAX")
    return a, b


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/policies.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=("shared-prefix", "multitenant"),
                   default="shared-prefix",
                   help="shared-prefix (default): loadgen's shared-prefix workload, one pdlb;"
                        " multitenant: tenants with long prefixes, KV events, 1 and 3 pdlb"
                        " replicas, kv_aware")
    p.add_argument("--policies", default=None,
                   help=f"prefill policies, comma-separated (default {DEFAULT_POLICIES};"
                        f" multitenant: {MULTITENANT_POLICIES})")
    p.add_argument("--policy", action="append", default=[], metavar="NAME[:K=V;K=V]",
                   help="a prefill policy with options as TOML values (repeatable; replaces"
                        " --policies), e.g. 'score:weights={load = 2};load_factor=1.5'")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of load per policy (default 20; multitenant 25)")
    p.add_argument("--rate", type=float, default=16.0, help="requests/s (Poisson)")
    p.add_argument("--groups", type=int, default=48, help="shared system prompts")
    p.add_argument("--prefix-len", type=int, default=2048, help="tokens per system prompt")
    p.add_argument("--input-len", type=int, default=256, help="tokens per question")
    p.add_argument("--output-len", type=int, default=32, help="tokens generated per request")
    p.add_argument("--prefill-kv-tokens", type=int, default=None,
                   help="KV-cache size of each prefill emulator, in tokens (default 50000;"
                        " multitenant 40000)")
    m = p.add_argument_group("multitenant scenario")
    m.add_argument("--tenants", type=int, default=48, help="tenants (shared prefixes)")
    m.add_argument("--prefix-range", type=_range, default=(1024, 2048), metavar="MIN:MAX",
                   help="tokens of a tenant's shared prefix, uniform (default 1024:2048)")
    m.add_argument("--question-range", type=_range, default=(32, 256), metavar="MIN:MAX",
                   help="tokens of a request's own question, uniform (default 32:256)")
    m.add_argument("--tenant-skew", type=float, default=0.8,
                   help="Zipf exponent of tenant popularity (0 = uniform; default 0.8)")
    m.add_argument("--max-requests", type=int, default=2000,
                   help="bound on the trace's requests (default 2000)")
    m.add_argument("--replicas", default="1,3",
                   help="pdlb replica counts, comma-separated (default 1,3)")
    m.add_argument("--decode-kv-tokens", type=int, default=40_000,
                   help="KV-cache size of each decode emulator, in tokens (default 40000)")
    m.add_argument("--no-kv-decode", action="store_true",
                   help="skip the run with kv_aware on the decode pool too")
    m.add_argument("--state-dir", type=Path, default=None,
                   help="write each replica's /metrics and /admin/state after each run here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out.append((m[1], dict(_LABEL.findall(m[2] or "")), float(m[3])))
    return out


async def _get(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as resp:
        return await resp.text()


async def _cache_counters(http: aiohttp.ClientSession, urls: Sequence[str]) -> tuple[float, float]:
    """Σ vllm:prefix_cache_hits and Σ vllm:prefix_cache_queries over ``urls``."""
    hits = queries = 0.0
    for text in await asyncio.gather(*(_get(http, u + "/metrics") for u in urls)):
        for name, _, value in _samples(text):
            if name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits"):
                hits += value
            elif name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries"):
                queries += value
    return hits, queries


class ImbalanceSampler:
    """Samples pdlb's per-backend in-flight tokens. Imbalance of a pool = Σ max / Σ mean over
    the samples (the max/mean of one sample, weighted by its load: moments with many tokens
    in flight count more than nearly idle ones, where max/mean is mostly noise). With several
    pdlb replicas a backend's tokens are the sum of what each replica has in flight there."""

    def __init__(self, http: aiohttp.ClientSession, pdlb_urls: str | Sequence[str],
                 every_s: float = 0.1):
        urls = [pdlb_urls] if isinstance(pdlb_urls, str) else list(pdlb_urls)
        self.http, self.urls, self.every_s = http, [u + "/metrics" for u in urls], every_s
        self.sums: dict[str, list[float]] = {"prefill": [0.0, 0.0], "decode": [0.0, 0.0]}

    async def run(self) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                per_backend: dict[tuple[str, str], float] = {}
                for text in await asyncio.gather(*(_get(self.http, u) for u in self.urls)):
                    for name, labels, value in _samples(text):
                        if (name == "pdlb_backend_inflight_tokens"
                                and labels.get("pool") in self.sums):
                            key = (labels["pool"], labels.get("backend", ""))
                            per_backend[key] = per_backend.get(key, 0.0) + value
                per_pool: dict[str, list[float]] = {"prefill": [], "decode": []}
                for (pool, _), value in per_backend.items():
                    per_pool[pool].append(value)
                for pool, values in per_pool.items():
                    if values:
                        self.sums[pool][0] += max(values)
                        self.sums[pool][1] += sum(values) / len(values)
            await asyncio.sleep(self.every_s)

    def imbalance(self, pool: str) -> float:
        top, mean = self.sums[pool]
        return top / mean if mean > 0 else float("nan")


def _toml(prefill: Sequence[str], decode: Sequence[str], spec: str,
          decode_spec: str = "least_tokens", extra: Sequence[str] = ()) -> str:
    """backends.toml for one run; ``spec`` and ``decode_spec`` are ``name`` or
    ``name:key=value;key=value``; ``extra``: more lines (whole tables) before the pools."""
    def urls(us: Sequence[str]) -> str:
        return "[" + ", ".join(f'"{u}"' for u in us) + "]"

    def options(text: str) -> list[str]:
        return [o.strip() for o in text.split(";") if o.strip()]

    name, _, prefill_options = spec.partition(":")
    decode_name, _, decode_options = decode_spec.partition(":")
    lines = [
        "[server]", 'host = "127.0.0.1"', "port = 0",
        "[health]", "interval_s = 1.0",
        "[scrape]", "interval_s = 1.0",
        *extra,
        "[pools.decode]", f"backends = {urls(decode)}", f'policy = "{decode_name}"',
        *(["[pools.decode.policy_options]", *options(decode_options)]
          if options(decode_options) else []),
        "[pools.prefill]", f"backends = {urls(prefill)}", f'policy = "{name}"',
        "[pools.prefill.policy_options]",
        *options(prefill_options),
    ]
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def _pdlb(config_path: Path) -> AsyncIterator[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lb.cli", "serve", "--config", str(config_path),
        "--log-level", "warning", stdout=asyncio.subprocess.PIPE,
    )
    try:
        if proc.stdout is None:
            raise RuntimeError("no stdout pipe to pdlb")
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if not line.startswith("pdlb listening on "):
            raise RuntimeError(f"pdlb did not start: {line!r}")
        yield line.split()[-1]
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _one_policy(args: argparse.Namespace, policy: str, prefill: Sequence[str],
                      decode: Sequence[str], workdir: Path,
                      http: aiohttp.ClientSession) -> dict[str, Any]:
    from loadgen import LengthDist, LoadConfig, run

    for url in (*prefill, *decode):
        async with http.post(url + "/_emulator/reset") as resp:
            resp.raise_for_status()
    hits0, queries0 = await _cache_counters(http, prefill)
    config_path = workdir / "backends.toml"
    config_path.write_text(_toml(prefill, decode, policy))
    async with _pdlb(config_path) as url:
        sampler = ImbalanceSampler(http, url)
        task = asyncio.create_task(sampler.run())
        try:
            result = await run(LoadConfig(
                url=url, endpoint="completions", rate=args.rate, duration_s=args.duration,
                prefix_groups=args.groups, prefix_len=args.prefix_len, questions_per_group=1000,
                input_len=LengthDist(args.input_len), output_len=LengthDist(args.output_len),
                seed=args.seed, preflight=False, label=policy,
            ))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    hits1, queries1 = await _cache_counters(http, prefill)
    summary = result.summary
    ttft = summary.get("ttft_ms") or {}
    return {
        "policy": policy,
        "completed": summary.get("completed", 0),
        "failed": summary.get("failed", 0),
        "hit_rate": (hits1 - hits0) / (queries1 - queries0) if queries1 > queries0 else 0.0,
        "ttft_p50": ttft.get("p50"),
        "ttft_p99": ttft.get("p99"),
        "imbalance_prefill": sampler.imbalance("prefill"),
        "imbalance_decode": sampler.imbalance("decode"),
        "throughput": summary.get("request_throughput"),
        "lag_p99": (summary.get("schedule_lag_ms") or {}).get("p99"),
    }


def _table(rows: Sequence[dict[str, Any]]) -> str:
    def ms(v: Any) -> str:
        return f"{v:.0f}" if isinstance(v, int | float) else "-"

    lines = [
        "| prefill policy | done/failed | req/s | prefix-cache hit rate | TTFT p50 ms "
        "| TTFT p99 ms | imbalance prefill (max/mean) | imbalance decode "
        "| loadgen lag p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['completed']}/{r['failed']} | {r['throughput'] or 0:.1f} "
            f"| {r['hit_rate']:.1%} | {ms(r['ttft_p50'])} | {ms(r['ttft_p99'])} "
            f"| {r['imbalance_prefill']:.2f} | {r['imbalance_decode']:.2f} "
            f"| {r['lag_p99'] or 0:.1f} |"
        )
    return "\n".join(lines)


def _policy_list(args: argparse.Namespace) -> list[str]:
    return list(args.policy) or [p.strip() for p in args.policies.split(",") if p.strip()]


async def _main(args: argparse.Namespace) -> int:
    from emulator.cluster import EmulatorCluster

    policies = _policy_list(args)
    started = time.monotonic()
    _say(args, "bench/policies: starting 4 prefill + 4 decode emulators ...")
    rows = []
    async with (
        EmulatorCluster(prefill=4, mode="subprocess", seed=args.seed,
                        kv_capacity_tokens=args.prefill_kv_tokens) as prefills,
        EmulatorCluster(decode=4, mode="subprocess", seed=args.seed) as decodes,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
    ):
        with tempfile.TemporaryDirectory(prefix="pdlb-bench-") as tmp:
            for policy in policies:
                _say(args, f"  {policy}: {args.rate:g} req/s for {args.duration:g} s"
                     f" [{time.monotonic() - started:.0f} s]")
                rows.append(await _one_policy(args, policy, prefills.prefill_urls,
                                              decodes.decode_urls, Path(tmp), http))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"4 prefill + 4 decode emulators (prefill KV {args.prefill_kv_tokens} tokens each);"
          f" {args.groups} system prompts x {args.prefix_len} tokens + {args.input_len}-token"
          f" questions, {args.output_len} output tokens; Poisson {args.rate:g} req/s for"
          f" {args.duration:g} s per policy; decode pool: least_tokens;"
          f" {os.cpu_count()} CPUs, load average {load}")
    print(_table(rows))
    _say(args, f"bench/policies: done in {time.monotonic() - started:.0f} s")
    return 1 if any(r["completed"] == 0 for r in rows) else 0


# ------------------------------------------------------------------ multitenant scenario
BLOCK = 16  # the emulators' KV block size (their default, as vLLM's)


@dataclasses.dataclass
class TenantTrace:
    """The multitenant workload, generated once; every run replays the same requests."""

    rows: list[dict[str, Any]]
    """JSONL rows for loadgen (prompt, max_tokens, timestamp) plus the tenant."""
    prefix_tokens: dict[int, int]
    """Tenant → tokens of its shared prefix as the emulator counts them (BOS included)."""
    prompt_tokens: int
    """Σ prompt tokens of all requests (emulator tokens)."""
    oracle_hits: int
    """Σ cached tokens with an infinite cache every request reaches."""

    @property
    def working_set(self) -> int:
        """Tokens of the prefixes of the tenants that appear (what the caches must hold)."""
        return sum(self.prefix_tokens.values())

    def split(self, replicas: int) -> list[list[dict[str, Any]]]:
        """Request i to replica i mod ``replicas``."""
        return [self.rows[i::replicas] for i in range(replicas)]


def make_trace(args: argparse.Namespace) -> TenantTrace:
    from emulator.prefix_cache import block_hashes
    from emulator.tokens import Tokenizer
    from loadgen.tokenizer import DEFAULT_TOKENIZER, load_tokenizer
    from loadgen.workload import TextMaker

    rng = random.Random(args.seed)
    text = TextMaker(load_tokenizer(DEFAULT_TOKENIZER))
    emulator = Tokenizer()
    lo, hi = args.prefix_range
    prefixes = [text.make(rng, rng.randint(lo, hi)) for _ in range(args.tenants)]
    weights = [1.0 / (k + 1) ** args.tenant_skew for k in range(args.tenants)]
    qlo, qhi = args.question_range
    rows: list[dict[str, Any]] = []
    prefix_tokens: dict[int, int] = {}
    seen: set[int] = set()
    prompt_tokens = oracle_hits = 0
    t = 0.0
    for _ in range(args.max_requests):
        t += rng.expovariate(args.rate)
        if t >= args.duration:
            break
        tenant = rng.choices(range(args.tenants), weights)[0]
        prompt = prefixes[tenant] + text.make(rng, rng.randint(qlo, qhi))
        rows.append({"prompt": prompt, "max_tokens": args.output_len,
                     "timestamp": round(t, 6), "tenant": tenant})
        ids = emulator.encode_prompt(prompt, add_bos=True)  # the emulator's --add-bos default
        if tenant not in prefix_tokens:
            prefix_tokens[tenant] = len(emulator.encode_prompt(prefixes[tenant], add_bos=True))
        hashes = block_hashes(ids, BLOCK)
        hit = 0
        for h in hashes[:(len(ids) - 1) // BLOCK]:  # never the prompt's last token
            if h not in seen:
                break
            hit += 1
        seen.update(hashes)
        prompt_tokens += len(ids)
        oracle_hits += hit * BLOCK
    return TenantTrace(rows, prefix_tokens, prompt_tokens, oracle_hits)


def _write_traces(workdir: Path, trace: TenantTrace, replicas: int,
                  ) -> list[tuple[Path, float]]:
    """One loadgen JSONL trace per replica; (path, its first timestamp) each."""
    out = []
    for i, part in enumerate(trace.split(replicas)):
        path = workdir / f"trace-{replicas}-{i}.jsonl"
        path.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "tenant"})
                                + "\n" for row in part))
        out.append((path, float(part[0]["timestamp"]) if part else 0.0))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _emulator(stack: contextlib.AsyncExitStack, role: str, seed: int,
                    kv_tokens: int) -> str:
    """One emulator publishing KV events on a free loopback port; its URL."""
    from emulator.cluster import ClusterError, EmulatorCluster

    for attempt in range(3):  # a port taken between _free_port and the bind: try another
        cluster = EmulatorCluster(
            prefill=int(role == "prefill"), decode=int(role == "decode"), mode="subprocess",
            seed=seed, kv_capacity_tokens=kv_tokens,
            kv_events_endpoint=f"tcp://127.0.0.1:{_free_port()}")
        try:
            await stack.enter_async_context(cluster)
        except ClusterError:
            if attempt == 2:
                raise
            continue
        return cluster.urls[0]
    raise AssertionError("unreachable")


async def _metrics_of(http: aiohttp.ClientSession, urls: Sequence[str],
                      ) -> list[list[tuple[str, dict[str, str], float]]]:
    return [_samples(t) for t in await asyncio.gather(*(_get(http, u + "/metrics")
                                                       for u in urls))]


def _total(scrapes: Sequence[Sequence[tuple[str, dict[str, str], float]]], name: str,
           **labels: str) -> float:
    """Σ of ``name`` over every scrape's samples whose labels include ``labels``."""
    return sum(value for samples in scrapes for n, ls, value in samples
               if n == name and all(ls.get(k) == v for k, v in labels.items()))


async def _emulator_counters(http: aiohttp.ClientSession, prefill: Sequence[str],
                             everyone: Sequence[str]) -> tuple[float, float, float]:
    """(prefill Σ hits, prefill Σ queries, Σ prompt tokens computed by every emulator)."""
    hits, queries = await _cache_counters(http, prefill)
    computed = _total(await _metrics_of(http, everyone),
                      "vllm:prompt_tokens_by_source_total", source="local_compute")
    return hits, queries, computed


async def _reset_when_followed(http: aiohttp.ClientSession, replicas: Sequence[str],
                               emulators: Sequence[str]) -> str:
    """Reset the emulators once every replica follows their events, until every replica's
    subscriber to every emulator is ``live`` (it got the AllBlocksCleared of a reset): each
    replica then starts from known, empty caches, as a long-running pdlb would see them.
    Bounded (20 s); says how it went."""
    want = len(replicas) * len(emulators)
    resets = 0
    deadline = time.monotonic() + 20
    states: dict[tuple[int, str], str] = {}
    while time.monotonic() < deadline:
        states = {}
        for i, samples in enumerate(await _metrics_of(http, replicas)):
            for name, labels, value in samples:
                if name == "pdlb_kv_events_state" and value == 1:
                    states[(i, labels.get("backend", ""))] = labels.get("state", "")
        if len(states) == want and all(s == "live" for s in states.values()) and resets:
            return f"events live on every replica after {resets} reset(s)"
        if len(states) == want and all(s in ("unknown", "live") for s in states.values()):
            for url in emulators:
                async with http.post(url + "/_emulator/reset") as resp:
                    resp.raise_for_status()
            resets += 1
            await asyncio.sleep(0.3)
        else:
            await asyncio.sleep(0.2)
    for url in emulators:  # go on from empty caches anyway, and say so
        async with http.post(url + "/_emulator/reset") as resp:
            resp.raise_for_status()
    not_live = sorted({s for s in states.values() if s != "live"}) or ["missing"]
    live = sum(s == "live" for s in states.values())
    return (f"WARNING: after 20 s and {resets} resets, {want - live} of {want} subscriptions"
            f" not live ({', '.join(not_live)})")


def _kv_extra() -> list[str]:
    return ["[tokenizer]", 'kind = "emulator"',
            "[kv_events]", "enabled = true",
            "[admin]", "enabled = true", f'token = "{ADMIN_TOKEN}"']


async def _one_multitenant(args: argparse.Namespace, prefill_spec: str, decode_spec: str,
                           replicas: int, traces: Sequence[tuple[Path, float]],
                           trace: TenantTrace,
                           prefill: Sequence[str], decode: Sequence[str], workdir: Path,
                           http: aiohttp.ClientSession) -> dict[str, Any]:
    from loadgen import LoadConfig, run
    from loadgen.metrics import percentile

    label = prefill_spec if decode_spec == "least_tokens" else f"{prefill_spec} / {decode_spec}"
    config_path = workdir / f"backends-{replicas}.toml"
    config_path.write_text(_toml(prefill, decode, prefill_spec, decode_spec, _kv_extra()))
    everyone = [*prefill, *decode]
    async with contextlib.AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(_pdlb(config_path)) for _ in range(replicas)]
        sync = await _reset_when_followed(http, urls, everyone)
        if sync.startswith("WARNING"):
            _say(args, f"    {sync}")
        before = await _emulator_counters(http, prefill, everyone)
        sampler = ImbalanceSampler(http, urls)
        task = asyncio.create_task(sampler.run())

        async def drive(i: int) -> Any:
            path, first = traces[i]
            await asyncio.sleep(first)  # a trace replays from its first timestamp
            return await run(LoadConfig(
                url=urls[i], endpoint="completions", dataset=str(path),
                duration_s=args.duration + 5, timeout_s=60.0, seed=args.seed,
                preflight=False, label=f"{label} r{i}"))

        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(drive(i) for i in range(replicas))), args.duration + 120)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        after = await _emulator_counters(http, prefill, everyone)
        scrapes = await _metrics_of(http, urls)
        if args.state_dir is not None:
            await _dump_state(args.state_dir, http, urls, f"{label}-{replicas}")
    records = [r for res in results for r in res.records]
    ttfts = sorted(r.ttft for r in records if r.ttft is not None)
    lags = sorted(r.schedule_lag for r in records if r.schedule_lag is not None)
    pred = {o: _total(scrapes, "pdlb_kv_predictions_total", pool="prefill", outcome=o)
            for o in ("exact", "over", "under")}
    err_sum = _total(scrapes, "pdlb_kv_prediction_error_tokens_sum", pool="prefill")
    err_count = _total(scrapes, "pdlb_kv_prediction_error_tokens_count", pool="prefill")
    picks = {(pool, src): _total(scrapes, "pdlb_kv_route_picks_total", pool=pool, source=src)
             for pool in ("prefill", "decode") for src in ("events", "approximate")}
    hits, queries = after[0] - before[0], after[1] - before[1]
    return {
        "policy": label,
        "replicas": replicas,
        "completed": sum(r.ok for r in records),
        "failed": sum(not r.ok for r in records),
        "hit_rate": hits / queries if queries > 0 else 0.0,
        "fleet_hit_rate": 1 - (after[2] - before[2]) / trace.prompt_tokens,
        "ttft_p50": percentile(ttfts, 50) * 1000 if ttfts else None,
        "ttft_p90": percentile(ttfts, 90) * 1000 if ttfts else None,
        "predictions": sum(pred.values()),
        "exact": pred["exact"] / sum(pred.values()) if sum(pred.values()) else None,
        "over": pred["over"],
        "under": pred["under"],
        "mean_error": err_sum / err_count if err_count else None,
        "predicted_tokens": _total(scrapes, "pdlb_kv_predicted_cached_tokens_total"),
        "reported_tokens": _total(scrapes, "pdlb_kv_reported_cached_tokens_total"),
        "picks": picks,
        "skipped": _total(scrapes, "pdlb_kv_skipped_prefill_total"),
        "gaps": _total(scrapes, "pdlb_kv_events_gaps_total"),
        "disconnects": _total(scrapes, "pdlb_kv_events_disconnects_total"),
        "imbalance_prefill": sampler.imbalance("prefill"),
        "imbalance_decode": sampler.imbalance("decode"),
        "lag_p99": percentile(lags, 99) * 1000 if lags else None,
        "sync": sync,
    }


async def _dump_state(directory: Path, http: aiohttp.ClientSession, urls: Sequence[str],
                      name: str) -> None:
    """Each replica's /metrics and /admin/state, as files in ``directory``."""
    stem = re.sub(r"[^\w.-]+", "_", name)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    files: dict[str, str] = {}
    for i, url in enumerate(urls):
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            files[f"{stem}-r{i}.metrics.txt"] = await _get(http, url + "/metrics")
            async with http.get(url + "/admin/state", headers=headers) as resp:
                files[f"{stem}-r{i}.state.json"] = await resp.text()
    _write_files(directory, files)


def _write_files(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.1%}" if whole > 0 else "-"


def _multitenant_table(rows: Sequence[dict[str, Any]], trace: TenantTrace) -> str:
    def ms(v: Any) -> str:
        return f"{v:.0f}" if isinstance(v, int | float) else "-"

    lines = [
        "| prefill policy (/ decode) | pdlb replicas | done/failed | prefill hit rate "
        "| fleet hit rate | TTFT p50 ms | TTFT p90 ms | predictions exact "
        "| mean abs error (tokens) | picks from events | prefills skipped "
        "| imbalance prefill | imbalance decode | loadgen lag p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    best = trace.oracle_hits / trace.prompt_tokens
    lines.append(f"| best possible (oracle) | - | - | {best:.1%} | {best:.1%} "
                 "| - | - | - | - | - | - | - | - | - |")
    for r in rows:
        picks = r["picks"]
        events = []
        for pool in ("prefill", "decode"):
            total = picks[(pool, "events")] + picks[(pool, "approximate")]
            if total > 0:
                events.append(f"{pool} {_share(picks[(pool, 'events')], total)}")
        exact = "-" if r["exact"] is None else f"{r['exact']:.1%} of {r['predictions']:.0f}"
        error = "-" if r["mean_error"] is None else f"{r['mean_error']:.1f}"
        lines.append(
            f"| {r['policy']} | {r['replicas']} | {r['completed']}/{r['failed']} "
            f"| {r['hit_rate']:.1%} | {r['fleet_hit_rate']:.1%} | {ms(r['ttft_p50'])} "
            f"| {ms(r['ttft_p90'])} | {exact} | {error} | {', '.join(events) or '-'} "
            f"| {r['skipped']:.0f} | {r['imbalance_prefill']:.2f} "
            f"| {r['imbalance_decode']:.2f} | {r['lag_p99'] or 0:.1f} |")
    return "\n".join(lines)


async def _main_multitenant(args: argparse.Namespace) -> int:
    policies = _policy_list(args)
    runs = [(p, "least_tokens") for p in policies]
    if not args.no_kv_decode:
        runs.append(("kv_aware", "kv_aware"))
    replica_counts = [int(r) for r in args.replicas.split(",") if r.strip()]
    if not replica_counts or min(replica_counts) < 1 or max(replica_counts) > 8:
        raise SystemExit("--replicas: counts between 1 and 8, comma-separated")
    started = time.monotonic()
    trace = make_trace(args)
    capacity = args.prefill_kv_tokens
    if not trace.rows:
        raise SystemExit("the trace is empty: raise --duration or --rate")
    fits = ("larger than one prefill server's KV cache but fitting in the four together"
            if capacity < trace.working_set <= 4 * capacity else
            "WARNING: not between one prefill server's KV cache and the four together")
    _say(args, f"bench/policies multitenant: {len(trace.rows)} requests,"
         f" {len(trace.prefix_tokens)} tenants, prefix working set {trace.working_set}"
         f" tokens ({fits}); starting 4 prefill + 4 decode emulators ...")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pdlb-bench-") as tmp:
        workdir = Path(tmp)
        traces = {n: _write_traces(workdir, trace, n) for n in replica_counts}
        async with contextlib.AsyncExitStack() as stack:
            roles = [("prefill", capacity)] * 4 + [("decode", args.decode_kv_tokens)] * 4
            urls = await asyncio.gather(*(_emulator(stack, role, args.seed, kv)
                                          for role, kv in roles))
            prefill, decode = urls[:4], urls[4:]
            http = await stack.enter_async_context(
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)))
            for n in replica_counts:
                for prefill_spec, decode_spec in runs:
                    _say(args, f"  {prefill_spec} / {decode_spec}, {n} pdlb: {len(trace.rows)}"
                         f" requests over {args.duration:g} s [{time.monotonic() - started:.0f} s]")
                    r = await _one_multitenant(args, prefill_spec, decode_spec, n, traces[n],
                                               trace, prefill, decode, workdir, http)
                    rows.append(r)
                    _say(args, f"    {r['completed']}/{r['failed']} done, prefill hit rate"
                         f" {r['hit_rate']:.1%}, fleet {r['fleet_hit_rate']:.1%}, TTFT p50/p90"
                         f" {r['ttft_p50'] or 0:.0f}/{r['ttft_p90'] or 0:.0f} ms,"
                         f" {r['skipped']:.0f} prefills skipped; {r['sync']}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    qlo, qhi = args.question_range
    plo, phi = args.prefix_range
    print(f"4 prefill + 4 decode emulators (time_scale 1; KV cache {capacity} tokens per"
          f" prefill, {args.decode_kv_tokens} per decode; events on loopback ZMQ);"
          f" {len(trace.rows)} requests of {len(trace.prefix_tokens)} tenants"
          f" (of {args.tenants}; Zipf {args.tenant_skew:g}), prefixes {plo}-{phi} tokens,"
          f" questions {qlo}-{qhi} tokens, {args.output_len} output tokens; Poisson"
          f" {args.rate:g} req/s for {args.duration:g} s per run; pdlb: tokenizer emulator,"
          f" kv_events on, requests round-robin over the replicas; {os.cpu_count()} CPUs,"
          f" load average {load}")
    print(f"prefix working set {trace.working_set} tokens: {fits}"
          f" ({capacity} each, {4 * capacity} together); prompt tokens sent"
          f" {trace.prompt_tokens}")
    print(_multitenant_table(rows, trace))
    for r in rows:
        if r["over"] or r["under"] or r["gaps"] or r["disconnects"] or \
                r["sync"].startswith("WARNING"):
            print(f"note {r['policy']} x{r['replicas']}: predictions over {r['over']:.0f},"
                  f" under {r['under']:.0f}; predicted {r['predicted_tokens']:.0f} vs reported"
                  f" {r['reported_tokens']:.0f} cached tokens; event gaps {r['gaps']:.0f},"
                  f" disconnects {r['disconnects']:.0f}; {r['sync']}")
    _say(args, f"bench/policies: done in {time.monotonic() - started:.0f} s")
    return 1 if any(r["completed"] == 0 for r in rows) else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    multitenant = args.scenario == "multitenant"
    if args.duration is None:
        args.duration = 25.0 if multitenant else 20.0
    if args.prefill_kv_tokens is None:
        args.prefill_kv_tokens = 40_000 if multitenant else 50_000
    if args.policies is None:
        args.policies = MULTITENANT_POLICIES if multitenant else DEFAULT_POLICIES
    return asyncio.run(_main_multitenant(args) if multitenant else _main(args))


if __name__ == "__main__":
    sys.exit(main())
