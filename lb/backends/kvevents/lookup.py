"""What the request path asks of one pool's KV events: which backends hold how much of this
prompt, counting only backends whose events can be trusted right now.

A backend's answer from the index is trusted while it is **fresh**: its subscriber is
``live`` (a gap being replayed, a dropped connection or a restart make it unknown: the
index already dropped its entries) and it has not gone quiet when it should have spoken.
vLLM publishes only when its cache changes, so silence alone means nothing (an idle engine,
or a prompt it already held). But a leg that should have stored new blocks — the prompt
was longer than what the index predicted by at least one block — must be followed by a
``BlockStored``: when none arrived within ``stale_after_s`` of that leg's end, the stream
is lost somewhere pdlb cannot see (a publisher that stopped, a PUB queue overflowing), and
the backend is stale until its next event. A stale or unknown backend is absent from
:meth:`PoolKV.cached_tokens`, which is how ``kv_aware`` knows to fall back to the
approximate index for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from lb.backends.kvevents.index import BlockIndex
from lb.backends.kvevents.subscriber import Health

HealthOf = Callable[[str], Health | None]


class PoolKV:
    """One pool's index, filtered by each backend's freshness."""

    def __init__(self, index: BlockIndex, health_of: HealthOf, stale_after_s: float) -> None:
        self.index = index
        self._health_of = health_of
        self.stale_after_s = stale_after_s
        self._expecting: dict[str, float] = {}
        """backend → when a leg that must have stored blocks ended (oldest unanswered)."""

    def fresh(self, backend: str, now: float | None = None) -> bool:
        """The backend's events are live and it has not gone quiet after storing work."""
        health = self._health_of(backend)
        if health is None or health.state != "live" or not self.index.known(backend):
            return False
        expected = self._expecting.get(backend)
        if expected is None:
            return True
        heard = health.last_event_at
        if heard is not None and heard >= expected:
            del self._expecting[backend]
            return True
        return (time.monotonic() if now is None else now) - expected <= self.stale_after_s

    def stale(self, backend: str) -> bool:
        """Live subscriber, but silent past ``stale_after_s`` after work that stores blocks."""
        health = self._health_of(backend)
        return (health is not None and health.state == "live" and self.index.known(backend)
                and not self.fresh(backend))

    def cached_tokens(self, prompt_token_ids: Sequence[int], model: str | None = None,
                      ) -> dict[str, int]:
        """``{backend URL: prompt tokens it holds}`` for the fresh backends only.

        ``model`` is the request's model: when the index has seen blocks stored under a LoRA
        adapter of that name, the lookup is in that adapter's namespace."""
        lora = model if model is not None and model in self.index.lora_names else None
        found = self.index.longest_prefix(prompt_token_ids, lora)
        if not found:
            return found
        now = time.monotonic()
        return {url: n for url, n in found.items() if self.fresh(url, now)}

    def leg_done(self, backend: str, prompt_tokens: int, predicted: int | None) -> None:
        """A leg finished on ``backend``: expect a BlockStored when it must have stored at
        least one new full block (the prompt beyond what was cached)."""
        size = self.index.block_size(backend)
        if size <= 0 or backend in self._expecting:
            return
        if (prompt_tokens // size) * size > (predicted or 0):
            self._expecting[backend] = time.monotonic()

    def forget(self, backend: str) -> None:
        self._expecting.pop(backend, None)
