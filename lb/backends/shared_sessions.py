"""Session affinity shared by the replicas of a cluster (``[cluster] share_sessions``).

A session's backends live in one Redis hash per session key,
``pdlb:{<cluster>}:session:<key>`` (field: pool name, value: backend URL), expiring
``session_ttl_s`` after its last write. The proxy starts :meth:`SharedSessions.get` when a
request with a session key arrives, concurrently with its admission (so the round trips
overlap), and hands the answer to the policy in ``RouteRequest.shared_session``; a pick that
differs from it is written back in the background (:meth:`SharedSessions.put`). Redis slow
or down: the lookup answers ``{}`` after ``timeout_ms`` and each replica's own session table
decides, as without a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from lb.backends.cluster import RedisBudgets

log = logging.getLogger("pdlb.cluster")


class SharedSessions:
    def __init__(self, budgets: RedisBudgets, ttl_s: float) -> None:
        self.budgets = budgets
        self.ttl_s = ttl_s
        self._prefix = f"pdlb:{{{budgets.config.name}}}:session:"
        self._writes: set[asyncio.Task[None]] = set()

    async def get(self, key: str) -> dict[str, str]:
        """The session's backend per pool; {} when unknown or Redis did not answer."""
        client: Any = self.budgets.client
        if client is None or not self.budgets.shared:
            return {}
        try:
            async with asyncio.timeout(self.budgets.timeout_s):
                raw = await client.hgetall(self._prefix + key)
        except Exception as exc:  # any failure: this replica's own table decides
            log.debug("cluster: session %r not read: %s", key, exc)
            return {}
        return {(k.decode() if isinstance(k, bytes) else str(k)):
                (v.decode() if isinstance(v, bytes) else str(v)) for k, v in raw.items()}

    def put(self, key: str, pool: str, url: str) -> None:
        """Record the session's backend in ``pool`` (in the background, bounded)."""
        if self.budgets.client is None or not self.budgets.shared:
            return
        task = asyncio.get_running_loop().create_task(self._put(key, pool, url))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, key: str, pool: str, url: str) -> None:
        client: Any = self.budgets.client
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.budgets.timeout_s):
                async with client.pipeline(transaction=True) as pipe:
                    pipe.hset(self._prefix + key, pool, url)
                    pipe.expire(self._prefix + key, max(1, int(self.ttl_s)))
                    await pipe.execute()

    async def stop(self) -> None:
        for task in list(self._writes):
            task.cancel()
        await asyncio.gather(*self._writes, return_exceptions=True)
