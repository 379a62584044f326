"""One backend's event stream: a ZMQ SUB socket per endpoint, sequence tracking, replay.

A subscriber feeds one backend's events into its pool's :class:`BlockIndex`. It never lets
the stream make the index lie:

- before the first message the backend is *unknown* (absent from lookups), not empty;
- a sequence gap (lost messages, a slow join) asks the publisher's replay endpoint (vLLM's
  ``ZmqEventPublisher`` ROUTER: send ``[b"", start_seq]``, receive ``[b"", seq, payload]``
  until seq = -1) when there is one; without one, or when the replay cannot cover the gap,
  the backend's entries are dropped and rebuilt from the events that follow;
- a sequence number going backwards is a restarted publisher: its old blocks are gone;
- a lost connection (ZMQ's socket monitor) drops the backend's entries at once: a restarted
  engine starts empty, and a cut stream cannot be trusted;
- a malformed payload or an unknown event type is counted and skipped, never raised.

Decoding runs on the event loop (msgspec decodes a batch in microseconds), one message at a
time; after ``slice_s`` of work in a row (a burst) the subscriber yields to other tasks, so a
burst never holds the loop for long (``bench/kv_events.py`` measures it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from lb.backends.kvevents.index import BlockIndex
from lb.backends.kvevents.wire import Decoded, Decoder

log = logging.getLogger("pdlb.kvevents")

END_SEQ = -1


@dataclass(slots=True)
class Endpoint:
    """Where one engine (one data-parallel rank) publishes."""

    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""


@dataclass(slots=True)
class Health:
    """Counters and state of one backend's stream (metrics and /admin/state read them)."""

    state: str = "unknown"
    """unknown (nothing heard yet) · live · resyncing (after a gap) · stopped"""
    received: int = 0
    decoded: int = 0
    """Events applied to the index."""
    dropped: int = 0
    """Malformed payloads or events, and events of unknown types."""
    unknown_types: int = 0
    gaps: int = 0
    replays: int = 0
    restarts: int = 0
    disconnects: int = 0
    orphans: int = 0
    last_seq: dict[int, int] = field(default_factory=dict)
    last_event_at: float | None = None
    endpoints: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        at = self.last_event_at
        age = None if at is None else round(time.monotonic() - at, 3)
        return {"state": self.state, "endpoints": self.endpoints, "received": self.received,
                "decoded": self.decoded, "dropped": self.dropped,
                "unknown_types": self.unknown_types, "gaps": self.gaps,
                "replays": self.replays, "restarts": self.restarts,
                "disconnects": self.disconnects, "orphans": self.orphans,
                "last_event_age_s": age}


class Subscriber:
    """Subscribes to every endpoint of one backend and applies its events to ``index``."""

    def __init__(self, backend: str, endpoints: list[Endpoint], index: BlockIndex, *,
                 context: zmq.asyncio.Context, replay_timeout_s: float = 1.0,
                 slice_s: float = 0.0005) -> None:
        self.backend = backend
        self.endpoints = endpoints
        self.index = index
        self.health = Health(endpoints=[e.endpoint for e in endpoints])
        self._ctx = context
        self._decoder = Decoder()
        self._replay_timeout_s = replay_timeout_s
        self._slice_s = slice_s
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for rank, ep in enumerate(self.endpoints):
            self._tasks.append(asyncio.create_task(self._run(rank, ep),
                                                   name=f"pdlb-kvevents {self.backend}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self.health.state = "stopped"

    def forget(self) -> None:
        """Drop the backend's entries now (restart, ejection): unknown until it publishes."""
        self.index.drop(self.backend)
        self.health.last_seq.clear()
        self.health.state = "unknown"

    async def _run(self, slot: int, ep: Endpoint) -> None:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SUBSCRIBE, ep.topic.encode())
        monitor = asyncio.create_task(self._watch_disconnects(slot, ep, sock),
                                      name=f"pdlb-kvevents-monitor {self.backend}")
        try:
            sock.connect(ep.endpoint)
            budget = self._slice_s
            clock = time.perf_counter
            since = clock()
            while True:
                frames = await sock.recv_multipart()
                await self.handle(slot, ep, frames)
                now = clock()
                if now - since > budget:  # a burst: let request handlers run
                    await asyncio.sleep(0)
                    since = clock()
        except asyncio.CancelledError:
            raise
        except Exception:  # a socket error: log it, never take the app down
            log.exception("kv events of %s (%s): subscriber stopped", self.backend, ep.endpoint)
            self.health.state = "stopped"
        finally:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
            sock.close(linger=0)

    async def _watch_disconnects(self, slot: int, ep: Endpoint, sock: zmq.asyncio.Socket) -> None:
        """A lost connection is a publisher that stopped or restarted, or a network cut:
        either way what the index holds for the backend can no longer be trusted. Its
        entries go at once, and the next message starts a fresh sequence (no replay from
        a restarted engine's buffer mixed with the old engine's blocks)."""
        mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            while True:
                parse_monitor_message(await mon.recv_multipart())
                log.warning("kv events of %s: %s disconnected; its entries dropped",
                            self.backend, ep.endpoint)
                self.health.disconnects += 1
                self.forget()
        finally:
            sock.disable_monitor()
            mon.close(linger=0)

    async def handle(self, slot: int, ep: Endpoint, frames: list[bytes]) -> None:
        """One published message: sequence check, then decode and apply."""
        h = self.health
        h.received += 1
        msg = self._decoder.frames(frames)
        if msg.seq < 0:
            h.dropped += 1
            return
        last = h.last_seq.get(slot)
        if last is not None and msg.seq <= last:
            log.warning("kv events of %s: sequence went back %d -> %d: publisher restarted",
                        self.backend, last, msg.seq)
            h.restarts += 1
            self.index.drop(self.backend)
            h.last_seq.clear()
            last = None
        if (last is None and msg.seq > 0 and ep.replay_endpoint) or (
                last is not None and msg.seq != last + 1):
            start = 0 if last is None else last + 1
            if last is not None:
                h.gaps += 1
                log.warning("kv events of %s: sequence gap %d -> %d", self.backend, last, msg.seq)
            replayed = await self._replay(slot, ep, start, msg.seq)
            if not replayed and last is not None:
                self.index.drop(self.backend)  # rebuild from here on
        self._apply(slot, msg)

    def _apply(self, slot: int, msg: Decoded) -> None:
        h = self.health
        h.last_seq[slot] = msg.seq
        h.dropped += msg.malformed + msg.unknown
        h.unknown_types += msg.unknown
        if msg.malformed and not msg.events:
            return
        result = self.index.apply(self.backend, msg.events, msg.dp_rank)
        h.decoded += len(msg.events)
        h.orphans += result.orphans
        h.state = "live"
        h.last_event_at = time.monotonic()

    async def _replay(self, slot: int, ep: Endpoint, start: int, until: int) -> bool:
        """Fetch batches ``start .. until-1`` from the replay endpoint; True when all came."""
        if not ep.replay_endpoint:
            return False
        self.health.state = "resyncing"
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        got: list[Decoded] = []
        try:
            sock.connect(ep.replay_endpoint)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            async with asyncio.timeout(self._replay_timeout_s):
                while True:
                    frames = await sock.recv_multipart()
                    if len(frames) != 3:
                        continue
                    seq = int.from_bytes(frames[1], "big", signed=True)
                    if seq == END_SEQ:
                        break
                    if start <= seq < until:
                        got.append(self._decoder.payload(seq, frames[2]))
        except (TimeoutError, zmq.ZMQError) as exc:
            log.warning("kv events of %s: replay from %d failed (%s)", self.backend, start, exc)
            return False
        finally:
            sock.close(linger=0)
        got.sort(key=lambda d: d.seq)
        if [d.seq for d in got] != list(range(start, until)):
            log.warning("kv events of %s: replay could not cover %d..%d", self.backend,
                        start, until - 1)
            return False
        self.health.replays += 1
        for d in got:
            self.health.received += 1
            self._apply(slot, d)
        return True
