"""One pool's block index: which backend holds which prompt prefix, keyed by pdlb itself.

vLLM's block hashes depend on its hash algorithm and a per-process seed, so they are never
used as keys here: each stored block gets pdlb's own chained key, computed from the block's
token ids and its parent's key (``hash((parent_key, namespace, tokens))``, Python's hash of a
tuple of ints, which is the same in every process). Two pdlb replicas that hear the same
events therefore build the same index, and a prompt is looked up by hashing its own tokens.
A map from ``(backend, engine block hash)`` to the key makes ``BlockRemoved`` work.

The namespace keeps LoRA adapters and per-block extra keys (multimodal ids, cache salts)
apart: a block stored under a LoRA, or with extra keys, never matches a plain prompt.

Memory is bounded by ``max_blocks`` (backend, key) entries; past it the oldest stored are
forgotten (``evicted`` counts them). A backend the index has heard nothing from is absent
from :meth:`BlockIndex.longest_prefix` answers (unknown), not present with 0 (empty).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lb.backends.kvevents.wire import AllBlocksCleared, BlockRemoved, BlockStored, Event

EngineKey = tuple[int | None, int | None, str | None, Any]
"""(data-parallel rank, KV cache group, medium, vLLM's block hash) of one backend."""


def stable_hash(value: object) -> int:
    """A 63-bit hash of ``repr(value)`` that does not depend on PYTHONHASHSEED."""
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def namespace(lora_name: str | None = None, lora_id: int | None = None) -> int:
    """The namespace of a prompt or block: 0 for the base model, one per LoRA adapter."""
    if lora_name:
        return stable_hash(("lora", lora_name))
    if lora_id:
        return stable_hash(("lora_id", lora_id))
    return 0


def chain_keys(token_ids: Sequence[int], block_size: int, ns: int = 0,
               parent: int = 0) -> list[int]:
    """pdlb's keys of the full blocks of ``token_ids``, chained from ``parent``."""
    keys = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, ns, tuple(token_ids[start:start + block_size])))
        keys.append(parent)
    return keys


@dataclass(slots=True)
class _Holder:
    """What one backend holds: engine hash → key, and key → how many engine blocks hold it."""

    engine: dict[EngineKey, int] = field(default_factory=dict)
    refs: dict[int, int] = field(default_factory=dict)
    block_size: int = 0


@dataclass(slots=True)
class ApplyResult:
    stored: int = 0
    removed: int = 0
    orphans: int = 0
    """Stored blocks whose parent the index never saw (missed events): not indexed."""


class BlockIndex:
    """The blocks every backend of one pool holds, under pdlb's own keys."""

    def __init__(self, max_blocks: int = 500_000) -> None:
        self.max_blocks = max_blocks
        self.evicted = 0
        self._holders: dict[str, _Holder] = {}
        self._where: dict[int, int] = {}
        """key → bit mask of the backends holding it (ints: nothing for the cyclic GC to
        walk, and a lookup intersects holders with one ``&``)."""
        self._bit: dict[str, int] = {}
        self._order: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.lora_names: set[str] = set()
        """LoRA adapters seen in stored blocks: a request naming one as its model is looked
        up in that adapter's namespace."""

    # ---------------------------------------------------------------- introspection
    def __len__(self) -> int:
        """(backend, block) entries held."""
        return len(self._order)

    def known(self, backend: str) -> bool:
        """True once events from ``backend`` were applied (and not dropped since)."""
        return backend in self._holders

    def blocks(self, backend: str) -> int:
        holder = self._holders.get(backend)
        return len(holder.refs) if holder else 0

    def block_size(self, backend: str) -> int:
        """The backend's KV block size in tokens, as its events said (0 before any)."""
        holder = self._holders.get(backend)
        return holder.block_size if holder else 0

    def backends(self) -> list[str]:
        return list(self._holders)

    def snapshot(self) -> dict[int, frozenset[str]]:
        """Every key and the backends holding it (introspection and tests; O(entries))."""
        return {key: frozenset(b for b, bit in self._bit.items() if mask & bit)
                for key, mask in self._where.items()}

    # ---------------------------------------------------------------- updates
    def mark_known(self, backend: str) -> None:
        """The backend publishes: from now on its absence from a block means "not cached"."""
        self._holder(backend)

    def _holder(self, backend: str) -> _Holder:
        holder = self._holders.get(backend)
        if holder is None:
            holder = self._holders[backend] = _Holder()
            if backend not in self._bit:
                used = set(self._bit.values())
                self._bit[backend] = next(1 << i for i in range(len(used) + 1)
                                          if 1 << i not in used)
        return holder

    def _unhold(self, backend: str, key: int) -> None:
        mask = self._where.get(key)
        if mask is not None:
            mask &= ~self._bit[backend]
            if mask:
                self._where[key] = mask
            else:
                del self._where[key]

    def apply(self, backend: str, events: Sequence[Event],
              dp_rank: int | None = None) -> ApplyResult:
        """Apply one batch of ``backend``'s events, in order."""
        holder = self._holder(backend)
        result = ApplyResult()
        for event in events:
            if isinstance(event, BlockStored):
                self._store(backend, holder, event, dp_rank, result)
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    key = holder.engine.pop((dp_rank, event.group_idx, event.medium, h), None)
                    if key is not None:
                        self._unref(backend, holder, key)
                        result.removed += 1
            elif isinstance(event, AllBlocksCleared):
                self.clear(backend)
                holder = self._holder(backend)
        self._bound()
        return result

    def _store(self, backend: str, holder: _Holder, event: BlockStored, dp_rank: int | None,
               result: ApplyResult) -> None:
        size = event.block_size
        if size <= 0:
            return
        holder.block_size = size
        group, medium = event.group_idx, event.medium
        if event.parent_block_hash is None:
            parent = 0
        else:
            found = holder.engine.get((dp_rank, group, medium, event.parent_block_hash))
            if found is None:
                result.orphans += len(event.block_hashes)
                return
            parent = found
        ns = namespace(event.lora_name, event.lora_id)
        if event.lora_name and event.lora_name not in self.lora_names:
            self.lora_names.add(event.lora_name)
        tokens = event.token_ids
        extra = event.extra_keys
        for i, h in enumerate(event.block_hashes):
            chunk = tokens[i * size:(i + 1) * size]
            if len(chunk) < size:
                break
            block_ns = ns
            if extra is not None and i < len(extra) and extra[i] is not None:
                block_ns = stable_hash((ns, extra[i]))
            parent = hash((parent, block_ns, tuple(chunk)))
            ek = (dp_rank, group, medium, h)
            old = holder.engine.get(ek)
            if old == parent and parent in holder.refs:
                continue  # a repeated store (still held: nothing changes)
            if old is not None:
                self._unref(backend, holder, old)
            holder.engine[ek] = parent
            refs = holder.refs.get(parent, 0)
            holder.refs[parent] = refs + 1
            if refs == 0:
                self._where[parent] = self._where.get(parent, 0) | self._bit[backend]
                self._order[(backend, parent)] = None
            result.stored += 1

    def _unref(self, backend: str, holder: _Holder, key: int) -> None:
        refs = holder.refs.get(key, 0) - 1
        if refs > 0:
            holder.refs[key] = refs
            return
        holder.refs.pop(key, None)
        self._order.pop((backend, key), None)
        self._unhold(backend, key)

    def _bound(self) -> None:
        while len(self._order) > self.max_blocks:
            (backend, key), _ = self._order.popitem(last=False)
            holder = self._holders[backend]
            holder.refs.pop(key, None)
            self._unhold(backend, key)
            self.evicted += 1
            # engine hashes still pointing at the key: removals find nothing to unref
            # (refs is gone), and a child stored later chains from the key as before.

    def clear(self, backend: str) -> None:
        """The backend's cache is empty (AllBlocksCleared): it stays known, with nothing."""
        self.drop(backend)
        self._holder(backend)

    def drop(self, backend: str) -> None:
        """Forget everything about ``backend`` (restart, ejection, gap): it becomes unknown."""
        holder = self._holders.pop(backend, None)
        if holder is None:
            return
        for key in holder.refs:
            self._order.pop((backend, key), None)
            self._unhold(backend, key)
        del self._bit[backend]

    # ---------------------------------------------------------------- lookup
    def longest_prefix(self, prompt_token_ids: Sequence[int], lora_name: str | None = None,
                       ) -> dict[str, int]:
        """``{backend: cached tokens}`` for every known backend (0 when it holds nothing).

        Counts the leading full blocks of the prompt each backend holds, as vLLM finds
        them: vLLM always computes the prompt's last token itself (its cache hit is at
        most ``len - 1`` tokens, in whole blocks), so a block ending on the last token never
        counts and the answer is what the engine will report as ``cached_tokens``. Costs one
        tuple hash per block for each distinct block size.
        """
        out = dict.fromkeys(self._holders, 0)
        if not out:
            return out
        ns = namespace(lora_name)
        by_size: dict[int, int] = {}
        for backend, holder in self._holders.items():
            if holder.block_size:
                by_size[holder.block_size] = by_size.get(holder.block_size, 0) | self._bit[backend]
        where = self._where
        bits = self._bit
        n = len(prompt_token_ids) - 1  # vLLM's max_cache_hit_length
        tokens: Sequence[int] = ()
        for size, members in by_size.items():
            if n < size or not members & where.get(
                    hash((0, ns, tuple(prompt_token_ids[:size]))), 0):
                continue  # the usual miss, without copying the prompt
            if not tokens:
                tokens = tuple(prompt_token_ids)  # slices of a tuple are tuples: one copy
            alive = members
            parent = 0
            end = 0
            for start in range(0, n - size + 1, size):
                parent = hash((parent, ns, tuple(tokens[start:start + size])))
                held = alive & where.get(parent, 0)
                if held != alive:  # some backends' prefixes end here (rare: ≤ once each)
                    for backend, bit in bits.items():
                        if alive & bit and not held & bit:
                            out[backend] = end
                    alive = held
                    if not alive:
                        break
                end = start + size
            if alive:
                for backend, bit in bits.items():
                    if alive & bit:
                        out[backend] = end
        return out
