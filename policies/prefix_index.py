"""PrefixIndex: which backends recently received which prompt prefixes (a bounded LRU).

pdlb cannot ask vLLM what its prefix cache holds, so cache-aware policies remember where they
sent each prefix. Keys are cumulative block hashes from :attr:`RouteRequest.prefix_hashes`
(hash i covers blocks 0..i), values the indices of the last ``holders`` backends that got a
prompt with that prefix, most recent first.

Only checkpoints are kept — prefixes of 1, 2, 3, 4, 6, 8, 12, 16, 24, 32 ... blocks (powers
of two and 1.5× them) — so a pick costs about 16 dict operations however long the prompt,
and a match is reported at the longest checkpoint it reaches (within 25 % of the true
shared length at worst, exact for short prefixes). A prompt's checkpoints are refreshed
longest first, so its shorter prefixes are always more recent than its longer ones;
evicting least recent first therefore never drops a prefix while keeping a longer one, and a
lookup can stop at the first checkpoint it does not know. Memory is bounded by
``max_entries`` (about 180 bytes each).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence


def _ladder(limit: int) -> tuple[int, ...]:
    """Block counts 1, 2, 3, 4, 6, 8, 12, ... up to ``limit``."""
    counts = [1, 2, 3]
    power = 4
    while power <= limit:
        counts += [power, power * 3 // 2]
        power *= 2
    return tuple(c for c in counts if c <= limit)


CHECKPOINTS = _ladder(1 << 20)


class PrefixIndex:
    def __init__(self, max_entries: int, holders: int) -> None:
        if max_entries < 1 or holders < 1:
            raise ValueError("PrefixIndex needs max_entries >= 1 and holders >= 1")
        self.max_entries = max_entries
        self.holders = holders
        self._entries: OrderedDict[int, tuple[int, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, hashes: Sequence[int]) -> dict[int, int]:
        """Backend index → how many leading blocks of ``hashes`` it was last seen to hold
        (at checkpoint granularity)."""
        depth: dict[int, int] = {}
        entries = self._entries
        n = len(hashes)
        for blocks in CHECKPOINTS:
            if blocks > n:
                break
            held = entries.get(hashes[blocks - 1])
            if held is None:
                break
            for index in held:
                depth[index] = blocks
        return depth

    def record(self, hashes: Sequence[int], index: int) -> None:
        """Remember that backend ``index`` now holds every prefix of ``hashes``."""
        entries = self._entries
        holders = self.holders
        n = len(hashes)
        for blocks in reversed(CHECKPOINTS[:bisect_right(CHECKPOINTS, n)]):
            h = hashes[blocks - 1]
            held = entries.get(h)
            if held is None:
                entries[h] = (index,)
                continue
            if held[0] != index:
                entries[h] = (index, *(i for i in held if i != index))[:holders]
            entries.move_to_end(h)
        for _ in range(len(entries) - self.max_entries):
            entries.popitem(last=False)

    def drop(self, hashes: Sequence[int], index: int) -> None:
        """Forget that backend ``index`` holds the prefixes of ``hashes`` (e.g. its request
        failed, so nothing may have been cached); other holders are kept."""
        entries = self._entries
        for blocks in CHECKPOINTS[:bisect_right(CHECKPOINTS, len(hashes))]:
            h = hashes[blocks - 1]
            held = entries.get(h)
            if held is None or index not in held:
                continue
            rest = tuple(i for i in held if i != index)
            if rest:
                entries[h] = rest
            else:
                del entries[h]
