"""What changes at 100 replicas and 10,000 backends? Measured pieces, then the arithmetic.

    .venv/bin/python bench/scale.py            # ~1 min; needs redis-server on PATH

1. Shared admission (lb/backends/cluster.py): Redis-side µs per reservation script as the
   number of live replica leases grows (1 → 1,000), from Redis's own ``INFO commandstats``
   (``usec_per_call`` of EVALSHA), so the client and loopback are left out.
2. The KV-event index (lb/backends/kvevents/index.py): µs per ``longest_prefix`` for a
   2,048-token prompt as one pool grows (8 → 10,000 backends), with the prompt's prefix
   held by 1 % of them and every backend holding 200 blocks of its own.
3. Event volume: µs to decode and apply one BlockStored batch (16 blocks of 16 tokens), and
   so the share of one core a replica spends on events for a fleet of N backends each
   publishing R batches/s.
4. Kubernetes watch fan-out: µs to parse one pod watch event (a ~2 KB pod JSON), and so the
   events per second the API server sends and each replica parses when N pods churn.

Prints a Markdown report; docs/scale.md quotes one run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from lb.backends import cluster
from lb.backends.kvevents.index import BlockIndex
from lb.backends.kvevents.wire import BlockStored, Decoder, encode_batch

BS = 16


def best(stmt: object, number: int) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e6  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- 1. Redis
def bench_redis(leases: list[int]) -> list[str]:
    import redis

    server = shutil.which("redis-server")
    if server is None:
        return ["(redis-server not found: part 1 skipped)"]
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="pdlb-scale-")
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", tmp],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = redis.Redis(port=port)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        reserve = r.register_script(cluster._RESERVE)
        adjust = r.register_script(cluster._ADJUST)
        out = ["| live replica leases | Redis µs per request (reserve + release) | requests/s "
               "one Redis core can admit |", "|---:|---:|---:|"]
        for n in leases:
            r.flushall()
            members = "pdlb:{x}:replicas"
            for i in range(n):
                key = f"pdlb:{{x}}:lease:r{i}"
                r.hset(key, mapping={"prefill": 100, "decode": 1000})
                r.pexpire(key, 600_000)
                r.sadd(members, key)
            me = "pdlb:{x}:lease:r0"
            args = [600_000, "prefill", 10, -1, "decode", 10, -1]
            r.config_resetstat()
            calls = 2000 if n <= 100 else 300
            for _ in range(calls):
                reserve(keys=[members, me], args=args)
                adjust(keys=[members, me], args=[600_000, "prefill", -10, "decode", -10])
            stats = r.info("commandstats")
            per = stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0.0)
            pair = 2 * per  # usec_per_call averages the two scripts: one of each per request
            out.append(f"| {n:,} | {pair:.0f} | {1e6 / max(pair, 1e-9):,.0f} |")
        return out
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- 2. index
def bench_index(sizes: list[int]) -> list[str]:
    out = ["| backends in the pool | entries | µs per longest_prefix (2,048 tokens, held by "
           "1 %) |", "|---:|---:|---:|"]
    prompt = [(i * 31) % 50_000 for i in range(2048)]
    shared = [BlockStored(block_hashes=list(range(1, 129)), parent_block_hash=None,
                          token_ids=prompt, block_size=BS)]
    for n in sizes:
        index = BlockIndex(max_blocks=10_000_000)
        for b in range(n):
            url = f"http://10.0.{b // 250}.{b % 250}:8000"
            own = [(b * 7919 + i) % 50_000 for i in range(200 * BS)]
            index.apply(url, [BlockStored(block_hashes=list(range(1000, 1200)),
                                          parent_block_hash=None, token_ids=own,
                                          block_size=BS)])
            if b % 100 == 0:
                index.apply(url, shared)
        number = 200 if n <= 1000 else 20
        us = best(lambda index=index: index.longest_prefix(prompt), number)
        out.append(f"| {n:,} | {len(index):,} | {us:,.0f} |")
    return out


# ----------------------------------------------------------------------------- 3. events
def bench_events() -> tuple[float, list[str]]:
    decoder = Decoder()
    index = BlockIndex()
    payloads = []
    for seq in range(2000):
        tokens = [(seq * 7919 + i) % 50_000 for i in range(16 * BS)]
        payloads.append(encode_batch([BlockStored(
            block_hashes=[seq * 100 + i + 1 for i in range(16)], parent_block_hash=None,
            token_ids=tokens, block_size=BS, medium="GPU")], time.time()))
    it = iter(range(10**9))

    def one() -> None:
        i = next(it) % len(payloads)
        msg = decoder.payload(i, payloads[i])
        index.apply(f"b{i % 64}", msg.events)

    us = best(one, 2000)
    out = [f"decode + apply one BlockStored batch (16 blocks × 16 tokens): **{us:.1f} µs**", "",
           "| backends | batches/s each | batches/s in all | one core's share |",
           "|---:|---:|---:|---:|"]
    for backends, rate in ((100, 10), (1_000, 10), (10_000, 10), (10_000, 50)):
        total = backends * rate
        out.append(f"| {backends:,} | {rate} | {total:,} | {total * us / 1e6:.0%} |")
    return us, out


# ----------------------------------------------------------------------------- 4. k8s
def bench_watch() -> list[str]:
    pod = {"type": "MODIFIED", "object": {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": "vllm-prefill-7", "namespace": "llm", "uid": "x" * 36,
                     "resourceVersion": "123456789", "labels": {"llm-d.ai/role": "prefill",
                                                                "app": "vllm"},
                     "annotations": {f"a{i}": "v" * 60 for i in range(12)}},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.32.0",
                                 "args": ["--port", "8000"] * 20,
                                 "ports": [{"name": "http", "containerPort": 8000}],
                                 "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
        "status": {"phase": "Running", "podIP": "10.0.3.7",
                   "conditions": [{"type": t, "status": "True",
                                   "lastTransitionTime": "2026-12-07T00:00:00Z"}
                                  for t in ("Initialized", "Ready", "ContainersReady",
                                            "PodScheduled")]}}}
    line = orjson.dumps(pod)
    us = best(lambda: orjson.loads(line), 20000)
    out = [f"one pod watch event: {len(line):,} bytes, **{us:.1f} µs** to parse", "",
           "| replicas | pods | pod changes/s (churn) | events/s from the API server | "
           "parse share of one core per replica |", "|---:|---:|---:|---:|---:|"]
    for replicas, pods, churn in ((3, 100, 1), (100, 10_000, 10), (100, 10_000, 100)):
        out.append(f"| {replicas} | {pods:,} | {churn} | {replicas * churn:,} | "
                   f"{churn * us / 1e6:.3%} |")
    return out


def main() -> int:
    print(f"# pdlb at scale — {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}\n")
    print("## 1. Shared admission: Redis time per reservation vs live replicas\n")
    print("\n".join(bench_redis([1, 10, 100, 1000])))
    print("\n## 2. KV-event index lookup vs backends per pool\n")
    print("\n".join(bench_index([8, 100, 1000, 10_000])))
    print("\n## 3. KV-event volume\n")
    print("\n".join(bench_events()[1]))
    print("\n## 4. Kubernetes watch fan-out\n")
    print("\n".join(bench_watch()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
