"""An LRU prefix cache over chained hashes of full KV blocks, like vLLM's.

Block ``i`` of a prompt hashes ``(hash of block i-1, tokens of block i)`` (the first one
also takes the request's ``cache_salt``), so a hit on block ``i`` implies hits on all
blocks before it. Only full blocks are cached, and a lookup never covers the whole prompt:
at least one token is always computed (vLLM's ``max_cache_hit_length = num_tokens - 1``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


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

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks
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

    def insert(self, hashes: Sequence[int], capacity_blocks: int | None = None) -> None:
        """Mark blocks resident (most recently used), then evict down to the capacity.

        ``capacity_blocks`` lets the engine shrink the cache to the blocks not in use.
        """
        blocks = self._blocks
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        cap = self.capacity_blocks if capacity_blocks is None else capacity_blocks
        while len(blocks) > cap:
            blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()
