"""One pool's block index: pdlb's own chained keys, removals by engine hash, clears, drops,
the memory bound, and lookups."""

from __future__ import annotations

from lb.backends.kvevents.index import BlockIndex, chain_keys
from lb.backends.kvevents.wire import AllBlocksCleared, BlockRemoved, BlockStored

T = list(range(100, 140))


def stored(hashes: list[int | bytes], parent: int | bytes | None, tokens: list[int],
           **kw: object) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens,
                       block_size=4, **kw)  # type: ignore[arg-type]


def test_keys_are_pdlbs_own_and_chained() -> None:
    """Two backends with different vLLM hashes for the same tokens share pdlb's keys; a
    block stored in two events chains through its parent's key."""
    ix = BlockIndex()
    ix.apply("a", [stored([1, 2], None, T[:8]), stored([3], 2, T[8:12])])
    ix.apply("b", [stored([b"x", b"y", b"z"], None, T[:12])])
    assert ix.longest_prefix(T) == {"a": 12, "b": 12}
    assert ix.longest_prefix(T[:11]) == {"a": 8, "b": 8}
    assert ix.longest_prefix([9, *T]) == {"a": 0, "b": 0}
    assert chain_keys(T[:12], 4) == chain_keys(T[:12], 4)  # no seed: same in every process


def test_removed_by_engine_hash() -> None:
    """BlockRemoved finds pdlb's key through the engine hash; the prefix stops there."""
    ix = BlockIndex()
    ix.apply("a", [stored([1, 2, 3], None, T[:12])])
    ix.apply("a", [BlockRemoved(block_hashes=[3, 999])])
    assert ix.longest_prefix(T) == {"a": 8} and ix.blocks("a") == 2
    ix.apply("a", [BlockRemoved(block_hashes=[1])])
    assert ix.longest_prefix(T) == {"a": 0}


def test_lora_and_extra_keys_kept_apart() -> None:
    """Blocks under a LoRA or with extra keys never match a plain prompt."""
    ix = BlockIndex()
    ix.apply("a", [stored([1], None, T[:4], lora_name="sql")])
    ix.apply("b", [stored([1], None, T[:4], extra_keys=[["salt"]])])
    assert ix.longest_prefix(T) == {"a": 0, "b": 0}
    assert ix.longest_prefix(T, lora_name="sql") == {"a": 4, "b": 0}


def test_clear_and_drop() -> None:
    """AllBlocksCleared empties a backend that stays known; drop makes it unknown."""
    ix = BlockIndex()
    ix.apply("a", [stored([1], None, T[:4])])
    ix.apply("b", [stored([7], None, T[:4])])
    ix.apply("a", [AllBlocksCleared()])
    assert ix.longest_prefix(T) == {"a": 0, "b": 4}
    ix.drop("b")
    assert ix.longest_prefix(T) == {"a": 0} and not ix.known("b") and len(ix) == 0


def test_unknown_backend_is_absent() -> None:
    """A backend nothing was heard from is not in the answer (unknown, not empty)."""
    ix = BlockIndex()
    assert ix.longest_prefix(T) == {}
    ix.mark_known("a")
    assert ix.longest_prefix(T) == {"a": 0}


def test_orphan_blocks_are_not_indexed() -> None:
    """A block whose parent the index never saw (a missed event) cannot be keyed."""
    ix = BlockIndex()
    result = ix.apply("a", [stored([5], 4, T[4:8])])
    assert result.orphans == 1 and ix.blocks("a") == 0


def test_bound_evicts_the_oldest() -> None:
    """Past max_blocks the oldest entries go, counted; removals of them are harmless."""
    ix = BlockIndex(max_blocks=5)
    ix.apply("a", [stored(list(range(1, 11)), None, T[:40])])
    assert len(ix) == 5 and ix.evicted == 5 and ix.blocks("a") == 5
    assert ix.longest_prefix(T) == {"a": 0}  # the first blocks were the oldest
    ix.apply("a", [BlockRemoved(block_hashes=[1, 2, 10])])
    assert len(ix) == 4


def test_same_block_in_two_ranks_counts_once_until_both_removed() -> None:
    """Two DP ranks of one backend holding a block: removing it from one keeps it."""
    ix = BlockIndex()
    ix.apply("a", [stored([1], None, T[:4])], dp_rank=0)
    ix.apply("a", [stored([9], None, T[:4])], dp_rank=1)
    assert ix.blocks("a") == 1
    ix.apply("a", [BlockRemoved(block_hashes=[1])], dp_rank=0)
    assert ix.longest_prefix(T) == {"a": 4}
    ix.apply("a", [BlockRemoved(block_hashes=[9])], dp_rank=1)
    assert ix.longest_prefix(T) == {"a": 0}


def test_each_backend_gets_its_own_prefix_length() -> None:
    """Backends whose cached prefixes end at different blocks, one holding a later block
    without the first (not a prefix: 0), and a prompt shorter than a block."""
    ix = BlockIndex()
    ix.apply("a", [stored([1, 2, 3], None, T[:12])])
    ix.apply("b", [stored([1], None, T[:4])])
    ix.apply("c", [stored([1, 2], None, T[:8]), BlockRemoved(block_hashes=[1])])
    ix.apply("d", [stored([1, 2], None, T[:8])])
    assert ix.longest_prefix(T) == {"a": 12, "b": 4, "c": 0, "d": 8}
    assert ix.longest_prefix(T[:3]) == {"a": 0, "b": 0, "c": 0, "d": 0}
