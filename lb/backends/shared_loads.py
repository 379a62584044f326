"""Per-backend in-flight numbers shared by the replicas of a cluster (``[cluster]
share_loads``), for the least-loaded policies.

Every ``load_interval_ms`` each replica makes one Lua call on the budgets' Redis: it writes
what it has in flight on each backend (a hash ``pdlb:{<cluster>}:load:<replica>``, expiring
with the lease TTL) and reads back the sum of every *other* live replica's hash. The sums go
into each :class:`~lb.backends.pool.Backend`'s ``others_tokens`` / ``others_requests``,
and the pools hand :class:`~lb.backends.pool.GlobalView` s to their policies.

The trade-off (README, Running N replicas): reading on every pick would add a Redis round
trip to every request leg and a Redis call per leg per replica; the cached numbers cost one
call per interval per replica and nothing on the request path, and are at most one interval
(plus a round trip) old — a burst that arrives at several replicas within one interval is
spread by each replica's own exact counts only. While Redis does not answer, the other
replicas' numbers are forgotten (each replica routes on its own counts, as without a
cluster). Measured (bench/cluster.py --balance), least_tokens balanced two decode backends
worse with these numbers than without — each replica balancing its own requests already
balances the sum, and the stale shared numbers make the replicas herd — so ``share_loads``
is off by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from lb.backends.cluster import RedisBudgets
from lb.backends.pool import Pool

log = logging.getLogger("pdlb.cluster")

_PUBLISH = """
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[1], KEYS[2])
local sums, out = {}, {}
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if key ~= KEYS[2] then
    local flat = redis.call('HGETALL', key)
    if #flat == 0 then
      redis.call('SREM', KEYS[1], key)
    else
      for i = 1, #flat, 2 do sums[flat[i]] = (sums[flat[i]] or 0) + tonumber(flat[i + 1]) end
    end
  end
end
for k, v in pairs(sums) do out[#out + 1] = k; out[#out + 1] = v end
return out
"""


class SharedLoads:
    """Publishes this replica's per-backend in-flight numbers and reads the others'."""

    def __init__(self, budgets: RedisBudgets, pools: Mapping[str, Pool],
                 interval_s: float) -> None:
        self.budgets = budgets
        self.pools = pools
        self.interval_s = interval_s
        prefix = f"pdlb:{{{budgets.config.name}}}"
        self._keys = [f"{prefix}:loads", f"{prefix}:load:{budgets.replica}"]
        self._task: asyncio.Task[None] | None = None
        self._script: Any = None
        self.rounds = 0
        for pool in pools.values():
            pool.global_view = True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop publishing and remove this replica's numbers (best effort, bounded; else
        they expire with the lease TTL)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        client = self.budgets.client
        if client is not None and self.budgets.shared:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.budgets.timeout_s):
                    await client.delete(self._keys[1])

    def _mine(self) -> list[str | int]:
        args: list[str | int] = [str(int(self.budgets.config.lease_ttl_s * 1000)), "_", 0]
        for name, pool in self.pools.items():
            for b in [*pool.backends, *pool.draining.values()]:
                if b.inflight_requests:
                    args += [f"{name}\t{b.url}\tt", b.inflight_tokens,
                             f"{name}\t{b.url}\tr", b.inflight_requests]
        return args

    def _apply(self, sums: Mapping[str, int]) -> None:
        for name, pool in self.pools.items():
            for b in pool.backends:
                b.others_tokens = max(0, sums.get(f"{name}\t{b.url}\tt", 0))
                b.others_requests = max(0, sums.get(f"{name}\t{b.url}\tr", 0))

    async def once(self) -> bool:
        """One publish-and-read round; False (and the others forgotten) when Redis did not
        answer."""
        client = self.budgets.client
        if client is None or not self.budgets.shared:
            self._apply({})
            return False
        if self._script is None:
            self._script = client.register_script(_PUBLISH)
        try:
            async with asyncio.timeout(self.budgets.timeout_s):
                flat = await self._script(keys=self._keys, args=self._mine())
        except Exception as exc:  # any failure: route on this replica's own counts
            log.debug("cluster: shared loads not read: %s", exc)
            self._apply({})
            return False
        sums = {}
        for i in range(0, len(flat) - 1, 2):
            key = flat[i].decode() if isinstance(flat[i], bytes) else str(flat[i])
            sums[key] = int(flat[i + 1])
        self._apply(sums)
        self.rounds += 1
        return True

    async def _run(self) -> None:
        while True:
            await self.once()
            await asyncio.sleep(self.interval_s)
