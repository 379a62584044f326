"""vLLM's own event structs, as ``vllm/distributed/kv_events.py`` defines them (msgspec,
``omit_defaults``, ``tag=True``), so the tests build payloads exactly as vLLM does.

``array_like`` batches are what vLLM 0.32 (CPU build) sent on this machine kind; the
current source defines the batch without it, so both are built.
"""

from __future__ import annotations

from typing import Any

import msgspec

ExternalBlockHash = bytes | int


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class MapEventBatch(msgspec.Struct, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base class for all KV cache-related events"""


class BlockStored(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class BlockMoved(KVCacheEvent):
    """An event type pdlb does not know (a future vLLM's)."""

    block_hashes: list[ExternalBlockHash]
    to: str


def stored(hashes: list[ExternalBlockHash], parent: ExternalBlockHash | None,
           tokens: list[int], block_size: int = 4, **kw: Any) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens,
                       block_size=block_size, lora_id=kw.pop("lora_id", None),
                       medium=kw.pop("medium", "GPU"), lora_name=kw.pop("lora_name", None), **kw)


def payload(*events: Any, array_like: bool = True, rank: int | None = 0) -> bytes:
    cls = EventBatch if array_like else MapEventBatch
    return msgspec.msgpack.encode(cls(ts=1.5, events=list(events), data_parallel_rank=rank))
