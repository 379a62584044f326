"""PrefixIndex: which backends recently received which prompt prefixes (a bounded LRU).

pdlb cannot ask vLLM what its prefix cache holds, so cache-aware policies remember where they
sent each prefix. Keys are the cumulative block hashes of :attr:`RouteRequest.prefix_hashes`
(hash i covers blocks 0..i), values the indices of the last ``holders`` backends that got a
prompt with that prefix, most recent first. The prompt's hashes are refreshed longest first,
so its shorter prefixes are always more recent than its longer ones; evicting least recent
first therefore never removes a prefix while keeping a longer one, and a lookup can stop at
the first hash it does not know. Memory is bounded by ``max_entries`` (about 150 bytes each).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


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
        """Backend index → how many leading blocks of ``hashes`` it was last seen to hold."""
        depth: dict[int, int] = {}
        entries = self._entries
        for i, h in enumerate(hashes, 1):
            held = entries.get(h)
            if held is None:
                break
            for index in held:
                depth[index] = i
        return depth

    def record(self, hashes: Sequence[int], index: int) -> None:
        """Remember that backend ``index`` now holds every prefix of ``hashes``."""
        entries = self._entries
        holders = self.holders
        for h in reversed(hashes):
            held = entries.get(h)
            if held is None:
                entries[h] = (index,)
                continue
            if held[0] != index:
                entries[h] = (index, *(i for i in held if i != index))[:holders]
            entries.move_to_end(h)
        excess = len(entries) - self.max_entries
        for _ in range(excess):
            entries.popitem(last=False)

