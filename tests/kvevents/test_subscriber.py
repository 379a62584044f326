"""One backend's subscriber on real ZMQ sockets over loopback: the stream, gaps (replayed or
rebuilt), a restarted publisher, garbage on the wire, and an endpoint that never answers.

The publisher is the emulator's (emulator/kv_events.py, written apart from pdlb's decoder).
A ZMQ subscriber misses what was sent before its subscription reached the publisher (the
slow joiner), so each test first publishes until the subscriber has heard something.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import msgspec
import pytest
import zmq
import zmq.asyncio

from emulator.kv_events import Publisher
from lb.backends.kvevents import BlockIndex, Endpoint, Subscriber
from tests.kvevents import vllm_structs as v

T = list(range(1000, 1064))
B = "http://backend:1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(check: Callable[[], bool], what: str, tries: int = 500) -> None:
    """Wait for ``check`` with a bounded number of short sleeps."""
    for _ in range(tries):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.term()


async def joined(pub: Publisher, sub: Subscriber) -> None:
    """Publish empty clears until the subscriber hears one (ZMQ's slow joiner)."""
    for _ in range(300):
        pub.cleared()
        pub.flush()
        await asyncio.sleep(0.01)
        if sub.health.state == "live":
            return
    raise AssertionError("the subscriber never joined")


async def setup(ctx: zmq.asyncio.Context, replay: bool = False,
                ) -> tuple[Publisher, Subscriber, BlockIndex]:
    port = free_port()
    rep = f"tcp://127.0.0.1:{free_port()}" if replay else None
    pub = Publisher(f"tcp://127.0.0.1:{port}", rep, topic="kv", block_size=4)
    pub.start()
    index = BlockIndex()
    sub = Subscriber(B, [Endpoint(f"tcp://127.0.0.1:{port}", rep, "kv")], index, context=ctx)
    sub.start()
    await joined(pub, sub)
    return pub, sub, index


async def test_stream_fills_the_index(ctx: zmq.asyncio.Context) -> None:
    """Stored blocks arrive in the index; removals take them out."""
    pub, sub, index = await setup(ctx)
    try:
        assert sub.health.state == "live"
        pub.stored([11, 12], None, T[:8])
        pub.flush()
        await until(lambda: index.longest_prefix(T) == {B: 8}, "blocks indexed")
        pub.removed([12])
        pub.flush()
        await until(lambda: index.longest_prefix(T) == {B: 4}, "block removed")
        assert sub.health.gaps == 0 and sub.health.dropped == 0
    finally:
        await sub.stop()
        await pub.stop()


async def test_gap_without_replay_drops_and_rebuilds(ctx: zmq.asyncio.Context) -> None:
    """Skipped sequence numbers: the backend's entries go, the next events rebuild it."""
    pub, sub, index = await setup(ctx)
    try:
        pub.stored([11], None, T[:4])
        pub.flush()
        await until(lambda: index.blocks(B) == 1, "first block")
        pub.skip_next = 3
        pub.stored([21], None, T[20:24])
        pub.flush()
        await until(lambda: sub.health.gaps == 1, "gap seen")
        assert index.longest_prefix(T) == {B: 0}  # block 11 dropped with the rest
        assert index.longest_prefix(T[20:]) == {B: 4}  # rebuilt from the new batch
    finally:
        await sub.stop()
        await pub.stop()


async def test_gap_is_replayed(ctx: zmq.asyncio.Context) -> None:
    """A lost batch comes back through vLLM's replay protocol: nothing is dropped."""
    pub, sub, index = await setup(ctx, replay=True)
    try:
        pub.drop_next = 1
        pub.stored([11], None, T[:4])  # lost on the PUB socket, kept in the replay buffer
        pub.flush()
        pub.stored([12], 11, T[4:8])
        pub.flush()
        await until(lambda: index.longest_prefix(T) == {B: 8}, "replayed parent + child")
        assert sub.health.gaps == 1 and sub.health.replays >= 1
    finally:
        await sub.stop()
        await pub.stop()


async def test_restarted_publisher_clears_the_backend(ctx: zmq.asyncio.Context) -> None:
    """A sequence number going back is a restarted engine: its old blocks are gone."""
    pub, sub, index = await setup(ctx)
    try:
        pub.stored([11], None, T[:4])
        pub.flush()
        await until(lambda: index.blocks(B) == 1, "first block")
        pub.seq = 0
        pub.stored([31], None, T[30:34])
        pub.flush()
        await until(lambda: sub.health.restarts == 1, "restart seen")
        assert index.longest_prefix(T) == {B: 0} and index.longest_prefix(T[30:]) == {B: 4}
    finally:
        await sub.stop()
        await pub.stop()


async def test_garbage_is_counted_never_raised(ctx: zmq.asyncio.Context) -> None:
    """Malformed msgpack, bad frames and unknown event types: counted, the stream goes on."""
    port = free_port()
    pub_sock = ctx.socket(zmq.PUB)
    pub_sock.bind(f"tcp://127.0.0.1:{port}")
    index = BlockIndex()
    sub = Subscriber(B, [Endpoint(f"tcp://127.0.0.1:{port}")], index, context=ctx)
    sub.start()
    seq = 0

    async def send(*frames: bytes) -> None:
        await pub_sock.send_multipart(list(frames))

    try:
        for _ in range(300):
            await send(b"kv", seq.to_bytes(8, "big"), v.payload(v.AllBlocksCleared()))
            seq += 1
            await asyncio.sleep(0.01)
            if sub.health.received:
                break
        last = sub.health.last_seq[0]
        seq = last + 1
        await send(b"kv", seq.to_bytes(8, "big"), b"\xc1\xc1 not msgpack")
        await send(b"kv", b"\x01")  # two frames
        await send(b"kv", (seq + 1).to_bytes(8, "big"),
                   v.payload(v.BlockMoved(block_hashes=[1], to="CPU"), v.stored([5], None, T[:4])))
        await until(lambda: index.blocks(B) == 1, "the good event after the bad ones")
        h = sub.health
        assert h.unknown_types == 1 and h.dropped == 3 and h.gaps == 0 and h.state == "live"
    finally:
        await sub.stop()
        pub_sock.close(linger=0)


async def test_silent_endpoint_stays_unknown(ctx: zmq.asyncio.Context) -> None:
    """Nobody publishes: the backend is unknown (absent from lookups), and stop is prompt."""
    index = BlockIndex()
    sub = Subscriber(B, [Endpoint(f"tcp://127.0.0.1:{free_port()}")], index, context=ctx)
    sub.start()
    await asyncio.sleep(0.05)
    assert sub.health.state == "unknown" and index.longest_prefix(T) == {}
    async with asyncio.timeout(5):
        await sub.stop()
    assert sub.health.state == "stopped"


def test_emulator_payload_is_vllm_shaped() -> None:
    """The emulator's batches decode with vLLM's own structs (array-like batch, tagged)."""
    pub = Publisher(f"tcp://127.0.0.1:{free_port()}", block_size=4)
    try:
        pub.stored([1], None, T[:4])
        pub.flush()
        _, payload = pub._buffer[-1]
        batch = msgspec.msgpack.decode(payload, type=v.EventBatch)
        event = msgspec.convert(batch.events[0], v.BlockStored)
        assert event.token_ids == T[:4] and event.block_size == 4 and batch.data_parallel_rank == 0
    finally:
        pub._pub.close(linger=0)
        pub._ctx.term()


async def test_lost_connection_drops_the_backend(ctx: zmq.asyncio.Context) -> None:
    """The publisher goes away (an engine restart): the entries go at once, before anything
    new is published; a new publisher on the same endpoint starts a fresh sequence."""
    pub, sub, index = await setup(ctx)
    endpoint = pub.endpoint
    pub.stored([11], None, T[:4])
    pub.flush()
    await until(lambda: index.blocks(B) == 1, "first block")
    seq = pub.seq
    await pub.stop()
    try:
        await until(lambda: sub.health.disconnects == 1, "disconnect seen")
        assert index.longest_prefix(T) == {} and sub.health.state == "unknown"
        pub = Publisher(endpoint, topic="kv", block_size=4)
        pub.seq = seq + 5  # a later number than the old engine's: still no replay, no gap
        await joined(pub, sub)
        pub.stored([31], None, T[30:34])
        pub.flush()
        await until(lambda: index.longest_prefix(T[30:]) == {B: 4}, "fresh blocks")
        assert sub.health.gaps == 0
    finally:
        await sub.stop()
        await pub.stop()
