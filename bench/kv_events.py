"""KV-events costs: decoding + indexing per batch, the prefix lookup per prompt, and how long
a burst of events holds the event loop.

    .venv/bin/python bench/kv_events.py            # ~10 s
    .venv/bin/python bench/kv_events.py --burst 20000

1. decode+apply: µs per batch of one BlockStored (16 blocks of 16 tokens, as vLLM on GPU sends
   for a 256-token prefill step), through pdlb's decoder and one pool's index.
2. memory: bytes per (backend, block) entry of the index (tracemalloc).
3. lookup: µs per ``longest_prefix`` over an index of 8 backends x 12,500 blocks, for
   prompts of 512, 2048 and 8192 tokens fully cached on one backend (the worst case: every
   block hashed and found).
4. loop lag: a publisher on loopback sends ``--burst`` batches as fast as it can to a real
   subscriber, while a ticker task in the subscriber's loop asks for 1 ms sleeps; the
   ticker's overshoot (max and p99) is the delay any request handler in that loop would see,
   next to the same ticker with no burst.

Timings are best-of-5 ``timeit`` runs on whatever else this machine is doing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import pathlib
import socket
import statistics
import sys
import tempfile
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import msgspec
import zmq
import zmq.asyncio

from lb.backends.kvevents import BlockIndex, Endpoint, Subscriber
from lb.backends.kvevents.wire import BlockStored, Decoder, encode_batch

BS = 16


def _batch(seq: int, parent: int | None) -> bytes:
    tokens = [(seq * 7919 + i) % 50_000 for i in range(16 * BS)]
    hashes = [seq * 100 + i + 1 for i in range(16)]
    return encode_batch([BlockStored(block_hashes=hashes, parent_block_hash=parent,
                                     token_ids=tokens, block_size=BS, medium="GPU")], time.time())


def best(stmt: object, number: int) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e6  # type: ignore[arg-type]


def bench_decode() -> None:
    payloads = [_batch(i, None) for i in range(1000)]
    decoder = Decoder()
    index = BlockIndex(max_blocks=10**7)
    it = iter(range(10**9))

    def decode_only() -> None:
        decoder.payload(0, payloads[next(it) % 1000])

    def decode_apply() -> None:
        i = next(it) % 1000
        msg = decoder.payload(i, payloads[i])
        index.apply("b", msg.events)

    print(f"decode, 1 BlockStored x16 blocks ({len(payloads[0])} B): "
          f"{best(decode_only, 2000):.1f} µs/batch")
    print(f"decode + index apply:                     {best(decode_apply, 2000):.1f} µs/batch")


def bench_memory() -> None:
    """Bytes per (backend, block) entry: engine hash map, refcounts, holders, LRU order."""
    import tracemalloc
    n = 50_000
    tokens = [i % 50_000 for i in range(n * BS)]
    event = BlockStored(block_hashes=[(i + 1) * 2_654_435_761 for i in range(n)],
                        parent_block_hash=None, token_ids=tokens, block_size=BS)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = BlockIndex(max_blocks=10**7)
    index.apply("http://b0", [event])
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(f"index memory: {used / n:.0f} B per block entry ({n} entries: {used / 2**20:.1f} MiB;"
          f" the default bound of 500,000 entries: ~{used / n * 5e5 / 2**20:.0f} MiB)")


def bench_lookup() -> None:
    index = BlockIndex(max_blocks=10**7)
    prompts = {n: [(n * 31 + i) % 50_000 for i in range(n)] for n in (512, 2048, 8192)}
    for b in range(8):
        tokens = [(b * 1_000_003 + i) % 50_000 for i in range(12_500 * BS)]
        index.apply(f"http://b{b}", [BlockStored(block_hashes=list(range(1, 12_501)),
                                                  parent_block_hash=None, token_ids=tokens,
                                                  block_size=BS)])
    for n, prompt in prompts.items():
        index.apply("http://b0", [BlockStored(block_hashes=[-(n * 10 + i) for i in range(n // BS)],
                                              parent_block_hash=None, token_ids=prompt,
                                              block_size=BS)])
    print(f"index: {len(index)} entries over 8 backends")
    for n, prompt in prompts.items():
        got = index.longest_prefix(prompt)
        assert got["http://b0"] == n, got
        miss = [50_001 + i for i in range(n)]
        hit = best(lambda p=prompt: index.longest_prefix(p), 200)
        missed = best(lambda p=miss: index.longest_prefix(p), 2000)
        print(f"longest_prefix {n:5d} tokens: hit {hit:7.1f} µs   miss at block 0 {missed:5.1f} µs")


async def _lags(seconds: float, stop: asyncio.Event | None = None) -> list[float]:
    lags = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end and not (stop and stop.is_set()):
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append((time.perf_counter() - t - 0.001) * 1000)
    return lags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _publish_process(port: int, n: int, ready: str) -> None:
    """The publisher, in its own process as vLLM's engine is: empty batches until the
    subscriber has joined and says go (the file ``ready``), then the burst, back to back."""
    payloads = [_batch(i, None) for i in range(n)]
    pub = zmq.Context().socket(zmq.PUB)
    pub.set_hwm(10**6)
    pub.bind(f"tcp://127.0.0.1:{port}")
    seq = 0
    while not os.path.exists(ready) and seq < 3000:
        pub.send_multipart([b"", seq.to_bytes(8, "big"), encode_batch([], 0.0)])
        seq += 1
        time.sleep(0.01)
    for p in payloads:
        pub.send_multipart([b"", seq.to_bytes(8, "big"), p])
        seq += 1
    time.sleep(1)
    pub.close(linger=1000)


async def bench_burst(n: int) -> None:
    port = _free_port()
    ctx = zmq.asyncio.Context()
    index = BlockIndex(max_blocks=10**7)
    sub = Subscriber("b", [Endpoint(f"tcp://127.0.0.1:{port}")], index, context=ctx)
    sub.start()
    ready = pathlib.Path(tempfile.mkdtemp()) / "go"
    proc = multiprocessing.get_context("spawn").Process(
        target=_publish_process, args=(port, n, str(ready)))
    proc.start()
    for _ in range(3000):  # the slow joiner: until one message got through
        await asyncio.sleep(0.01)
        if sub.health.received:
            break
    quiet = await _lags(0.5)
    received = sub.health.received
    ready.touch()
    for _ in range(3000):  # the burst begins
        await asyncio.sleep(0.001)
        if sub.health.decoded > 0 or sub.health.received > received + 1:
            break
    started = time.perf_counter()
    lag_task = asyncio.create_task(_lags(60.0, done := asyncio.Event()))
    for _ in range(60_000):
        if sub.health.decoded >= n * 1:
            break
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - started
    done.set()
    busy = await lag_task
    await sub.stop()
    ctx.term()
    proc.join(5)
    ready.unlink()
    ready.parent.rmdir()

    def p99(xs: list[float]) -> float:
        return statistics.quantiles(xs, n=100)[98]

    print(f"burst: {n} batches ({n * 16} blocks) received+applied in {elapsed:.2f} s "
          f"= {n / elapsed:,.0f} batches/s; gaps {sub.health.gaps}, dropped {sub.health.dropped}")
    print(f"loop lag (1 ms sleeps) quiet: max {max(quiet):.2f} ms p99 {p99(quiet):.2f} ms; "
          f"during burst: max {max(busy):.2f} ms p99 {p99(busy):.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=5000, help="batches in the burst")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, msgspec {msgspec.__version__}, "
          f"pyzmq {zmq.__version__}")
    bench_decode()
    bench_memory()
    bench_lookup()
    asyncio.run(bench_burst(args.burst))


if __name__ == "__main__":
    main()
