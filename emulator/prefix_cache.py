"""An LRU prefix cache over chained hashes of full KV blocks, like vLLM's.

Block ``i`` of a prompt hashes ``(hash of block i-1, tokens of block i)`` (the first one
also takes the request's ``cache_salt``), so a hit on block ``i`` implies hits on all
blocks before it. Only full blocks are cached, and a lookup never covers the whole prompt:
at least one token is always computed (vLLM's ``max_cache_hit_length = num_tokens - 1``).

With a ``publisher`` (emulator/kv_events.py) every block newly cached, every eviction and a
clear are published as vLLM's KV-cache events.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emulator.kv_events import Publisher


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str | None = None) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids``."""
    hashes: list[int] = []
    prev = hash(("salt", salt)) if salt else 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = hash((prev, tuple(token_ids[start : start + block_size])))
        hashes.append(prev)
    return hashes


class PrefixCache:
    """Which blocks' KV is still resident; LRU-evicted down to ``capacity_blocks``."""

    def __init__(self, capacity_blocks: int, publisher: Publisher | None = None) -> None:
        self.capacity_blocks = capacity_blocks
        self.publisher = publisher
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[int], num_tokens: int, block_size: int) -> int:
        """Tokens of a prompt of ``num_tokens`` found in the cache (a block multiple)."""
        limit = (num_tokens - 1) // block_size
        hit = 0
        blocks = self._blocks
        for h in hashes[:limit]:
            if h not in blocks:
                break
            blocks.move_to_end(h)
            hit += 1
        return hit * block_size

    def insert(self, hashes: Sequence[int], capacity_blocks: int | None = None, *,
               parent: int | None = None, token_ids: Sequence[int] = (),
               block_size: int = 0) -> None:
        """Mark blocks resident (most recently used), then evict down to the capacity.

        ``capacity_blocks`` lets the engine shrink the cache to the blocks not in use.
        ``parent`` (the hash before ``hashes[0]``), ``token_ids`` (the tokens of exactly
        these blocks) and ``block_size`` are what a publisher needs for BlockStored.
        """
        blocks = self._blocks
        run: list[int] = []  # newly stored blocks in a row: one BlockStored each run
        run_start = 0
        publisher = self.publisher if token_ids else None
        for i, h in enumerate(hashes):
            if h in blocks:
                blocks.move_to_end(h)
                if publisher is not None and run:
                    self._publish_run(run, run_start, hashes, parent, token_ids, block_size)
                    run = []
            else:
                blocks[h] = None
                if publisher is not None:
                    if not run:
                        run_start = i
                    run.append(h)
        if publisher is not None and run:
            self._publish_run(run, run_start, hashes, parent, token_ids, block_size)
        cap = self.capacity_blocks if capacity_blocks is None else capacity_blocks
        evicted = []
        while len(blocks) > cap:
            evicted.append(blocks.popitem(last=False)[0])
        if self.publisher is not None and evicted:
            self.publisher.removed(evicted)

    def _publish_run(self, run: list[int], start: int, hashes: Sequence[int],
                     parent: int | None, token_ids: Sequence[int], block_size: int) -> None:
        assert self.publisher is not None
        before = hashes[start - 1] if start > 0 else parent
        tokens = list(token_ids[start * block_size:(start + len(run)) * block_size])
        self.publisher.stored(run, before, tokens)

    def clear(self) -> None:
        self._blocks.clear()
        if self.publisher is not None:
            self.publisher.cleared()
