"""vLLM's KV-cache event wire: ``[topic, seq (8 bytes, big-endian), msgpack EventBatch]``.

The structs mirror ``vllm/distributed/kv_events.py`` (msgspec, ``tag=True``: each event is a
map whose ``type`` names its class), but every field but the block hashes has a default, so a
vLLM that adds or drops optional fields still decodes: unknown fields are ignored, unknown
event *types* are counted and skipped, and a payload that is not a batch at all is counted
and dropped. Nothing here raises: a publisher must never be able to crash the router.

The batch itself is array-like on the wire in the vLLM release checked on this machine kind
(``[ts, events, data_parallel_rank]``); a map-encoded batch is read too. The common case is
decoded in one typed pass (msgspec, no Python objects for the raw maps); only a batch that
fails it is re-read event by event to keep what can be kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

BlockHash = int | bytes
"""vLLM's ``ExternalBlockHash``: an int, or bytes with the sha256 hash algorithms."""


class BlockStored(msgspec.Struct, tag=True, gc=False):
    """Blocks the engine just cached; ``token_ids`` holds all their tokens, in order."""

    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None = None
    token_ids: list[int] = []
    block_size: int = 0
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class BlockRemoved(msgspec.Struct, tag=True, gc=False):
    """Blocks the engine evicted."""

    block_hashes: list[BlockHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, gc=False):
    """The engine dropped its whole prefix cache (a reset)."""


Event = BlockStored | BlockRemoved | AllBlocksCleared
KNOWN_TYPES = frozenset({"BlockStored", "BlockRemoved", "AllBlocksCleared"})


class _ArrayBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


class _MapBatch(msgspec.Struct, gc=False):
    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


class _Tag(msgspec.Struct):
    type: str = ""


@dataclass(slots=True)
class Decoded:
    """One message, decoded as far as it could be."""

    seq: int
    """The publisher's sequence number; -1 when the frames were not a message at all."""
    events: list[Event] = field(default_factory=list)
    ts: float = 0.0
    dp_rank: int | None = None
    unknown: int = 0
    """Events of a type this pdlb does not know (skipped)."""
    malformed: int = 0
    """Events, or the whole payload (1), that could not be read (dropped)."""


class Decoder:
    """Reusable decoders (msgspec's are faster built once)."""

    def __init__(self) -> None:
        self._array = msgspec.msgpack.Decoder(_ArrayBatch)
        self._map = msgspec.msgpack.Decoder(_MapBatch)
        self._raw = msgspec.msgpack.Decoder(list[msgspec.Raw] | dict[str, msgspec.Raw])
        self._raw_events = msgspec.msgpack.Decoder(list[msgspec.Raw])
        self._event = msgspec.msgpack.Decoder(Event)
        self._tag = msgspec.msgpack.Decoder(_Tag)

    def frames(self, frames: list[bytes]) -> Decoded:
        """Decode ``[topic, seq, payload]`` (the topic is not checked: SUB filters it)."""
        if len(frames) != 3 or len(frames[1]) != 8:
            return Decoded(seq=-1, malformed=1)
        return self.payload(int.from_bytes(frames[1], "big", signed=True), frames[2])

    def payload(self, seq: int, payload: bytes) -> Decoded:
        """Decode one EventBatch payload."""
        try:
            batch: _ArrayBatch | _MapBatch = self._array.decode(payload)
        except msgspec.DecodeError:
            try:
                batch = self._map.decode(payload)
            except msgspec.DecodeError:
                return self._salvage(seq, payload)
        return Decoded(seq=seq, events=batch.events, ts=batch.ts, dp_rank=batch.data_parallel_rank)

    def _salvage(self, seq: int, payload: bytes) -> Decoded:
        """The slow path: keep each event that decodes, count the others."""
        try:
            top = self._raw.decode(payload)
            if isinstance(top, list):
                if len(top) < 2:
                    return Decoded(seq=seq, malformed=1)
                raw_events = self._raw_events.decode(top[1])
            else:
                if "events" not in top:
                    return Decoded(seq=seq, malformed=1)
                raw_events = self._raw_events.decode(top["events"])
        except msgspec.DecodeError:
            return Decoded(seq=seq, malformed=1)
        out = Decoded(seq=seq)
        for raw in raw_events:
            try:
                out.events.append(self._event.decode(raw))
            except msgspec.DecodeError:
                try:
                    tag = self._tag.decode(raw).type
                except msgspec.DecodeError:
                    tag = ""
                if tag and tag not in KNOWN_TYPES:
                    out.unknown += 1
                else:
                    out.malformed += 1
        return out


def encode_batch(events: list[Event], ts: float, dp_rank: int | None = 0) -> bytes:
    """A payload as vLLM's publisher writes it (array-like batch, tagged events).

    Used by the emulator's publisher and the tests; vLLM omits defaults (``omit_defaults``)
    but keeps its required fields, which these structs write as they are.
    """
    return msgspec.msgpack.encode(_ArrayBatch(ts=ts, events=events, data_parallel_rank=dp_rank))
