"""vLLM's KV-cache events, published from the emulator's prefix cache on vLLM's wire.

With ``--kv-events-endpoint tcp://*:5557`` (or a host) the emulator binds a ZMQ PUB socket and
sends what vLLM's ``ZmqEventPublisher`` sends: ``[topic, seq (8 bytes big-endian), payload]``,
the payload a msgpack array-like ``EventBatch [ts, events, data_parallel_rank]`` whose events
are maps tagged by ``type`` (``BlockStored``, ``BlockRemoved``, ``AllBlocksCleared``). With
``--kv-events-replay-endpoint`` a ROUTER socket answers replay requests as vLLM's does:
``[identity, b"", start_seq]`` in, ``[identity, b"", seq, payload]`` per buffered batch out,
then ``seq = -1`` with an empty payload. ``GET /kv_event_sources`` answers the config the way
vLLM's API server does, so a router's discovery and any third-party consumer read it
unchanged. The structs are written here, not imported from pdlb: two independent
implementations of vLLM's format keep each other honest in the tests.

Events of one event-loop turn go out as one batch (vLLM sends one per scheduler step).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgspec
import zmq
import zmq.asyncio

log = logging.getLogger("emulator.kv_events")

END_SEQ = (-1).to_bytes(8, "big", signed=True)


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=False, omit_defaults=True, gc=False, tag=True):
    """Base of the tagged events (vLLM: ``tag=True``, the class name in ``type``)."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class Publisher:
    """The PUB socket (and the optional replay ROUTER) of one emulated engine."""

    def __init__(self, endpoint: str, replay_endpoint: str | None = None, topic: str = "kv",
                 buffer_steps: int = 10_000, block_size: int = 16) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.block_size = block_size
        self.buffer_steps = buffer_steps
        self.seq = 0
        self.skip_next = 0
        """Sequence numbers to skip on the next batch (a fault knob: a gap no replay covers)."""
        self.drop_next = 0
        """Batches to buffer for replay but not send (a fault knob: a lost message)."""
        self._ctx = zmq.Context()
        self._actx = zmq.asyncio.Context.shadow(self._ctx)
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.set_hwm(100_000)
        self._pub.bind(endpoint)
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._pending: list[Any] = []
        self._flush_scheduled = False
        self._encoder = msgspec.msgpack.Encoder()

    @property
    def bound_endpoint(self) -> str:
        """The endpoint actually bound (the port filled in when it was ``*`` / 0)."""
        return str(self._pub.getsockopt_string(zmq.LAST_ENDPOINT))

    def start(self) -> None:
        if self.replay_endpoint:
            self._replay = self._actx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(self.replay_endpoint)
            self._replay_task = asyncio.get_running_loop().create_task(
                self._serve_replay(), name="emulator-kv-replay")

    async def stop(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
        if self._replay is not None:
            self._replay.close(linger=0)
        self._pub.close(linger=0)
        self._ctx.destroy(linger=0)

    def sources(self, host: str) -> dict[str, dict[str, Any]]:
        """``GET /kv_event_sources``: vLLM's KVEventsConfig per DP rank."""
        return {"0": {"enable_kv_cache_events": True, "publisher": "zmq",
                      "endpoint": self.endpoint, "replay_endpoint": self.replay_endpoint,
                      "buffer_steps": self.buffer_steps, "hwm": 100_000,
                      "max_queue_size": 100_000, "topic": self.topic}}

    # ---------------------------------------------------------------- events
    def stored(self, hashes: Sequence[int], parent: int | None, token_ids: list[int]) -> None:
        self._add(BlockStored(block_hashes=list(hashes), parent_block_hash=parent,
                              token_ids=token_ids, block_size=self.block_size, lora_id=None,
                              medium="GPU", lora_name=None))

    def removed(self, hashes: Sequence[int]) -> None:
        self._add(BlockRemoved(block_hashes=list(hashes), medium="GPU"))

    def cleared(self) -> None:
        self._add(AllBlocksCleared())

    def _add(self, event: Any) -> None:
        self._pending.append(event)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (a unit test): send now
                self.flush()

    def flush(self) -> None:
        """Send the pending events as one batch."""
        self._flush_scheduled = False
        if not self._pending:
            return
        events, self._pending = self._pending, []
        payload = self._encoder.encode(EventBatch(ts=time.time(), events=events,
                                                  data_parallel_rank=0))
        self.seq += self.skip_next
        self.skip_next = 0
        seq = self.seq
        self.seq += 1
        self._buffer.append((seq, payload))
        if self.drop_next:
            self.drop_next -= 1
            return
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart((self.topic.encode(), seq.to_bytes(8, "big"), payload),
                                     flags=zmq.NOBLOCK)

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                log.warning("invalid replay request: %d frames", len(frames))
                continue
            client, _, start_bytes = frames
            start = int.from_bytes(start_bytes, "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"),
                                                       payload))
            await self._replay.send_multipart((client, b"", END_SEQ, b""))
