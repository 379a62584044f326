"""Admission budgets shared by N pdlb replicas through Redis (``[cluster]``).

Every replica keeps its reservations in its own lease, a hash
``pdlb:{<cluster>}:lease:<replica>`` with one field per stage, listed in the set
``pdlb:{<cluster>}:replicas``. A stage's global use is the sum over the live leases: a
replica killed with SIGKILL stops refreshing its lease, which expires after ``lease_ttl_s``,
and the next reservation prunes it from the set — its tokens are back.

* :meth:`RedisBudgets.reserve` is one Lua script (one round trip, atomic): sum the live
  leases, and add the request's tokens to this replica's lease only if every stage stays
  within its budget.
* Releases and corrections (:meth:`RedisBudgets.adjust`) leave the request path: they are
  summed and sent by one background task, one script call per batch.
* A background task refreshes the lease every ``lease_ttl_s / 3``.
* Any error or a call slower than ``timeout_ms``: Redis is down for this replica
  (``pdlb_cluster_redis_up`` 0, ``pdlb_cluster_fallback_total`` + 1, one warning line);
  admission goes on with local accounting (lb/admission.py). The task then asks Redis every
  second; when it answers, this replica's lease is rewritten from its own holdings (one
  info line) and the budgets are shared again.

The key names carry the cluster name as a hash tag, so that a Redis Cluster would keep them in
one slot; the scripts do read leases named in the set rather than in KEYS, which a standalone
Redis (what is tested) allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from lb.admission import StoreUnavailable
from lb.config import ClusterConfig
from lb.metrics import Counter, Metrics

log = logging.getLogger("pdlb.cluster")

_RESERVE = """
local n = (#ARGV - 1) / 3
local names, used = {}, {}
for i = 1, n do names[i] = ARGV[(i - 1) * 3 + 2]; used[i] = 0 end
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', key) == 1 then
    local values = redis.call('HMGET', key, unpack(names))
    for i = 1, n do used[i] = used[i] + (tonumber(values[i]) or 0) end
  else
    redis.call('SREM', KEYS[1], key)
  end
end
local answer = {'ok'}
for i = 1, n do
  local tokens = tonumber(ARGV[(i - 1) * 3 + 3])
  local limit = tonumber(ARGV[(i - 1) * 3 + 4])
  if limit >= 0 and used[i] + tokens > limit then answer[1] = names[i]; break end
end
if answer[1] == 'ok' then
  for i = 1, n do
    local tokens = tonumber(ARGV[(i - 1) * 3 + 3])
    redis.call('HINCRBY', KEYS[2], names[i], tokens)
    used[i] = used[i] + tokens
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
  redis.call('SADD', KEYS[1], KEYS[2])
end
for i = 1, n do answer[i + 1] = used[i] end
return answer
"""

_ADJUST = """
local existed = redis.call('EXISTS', KEYS[2])
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[1], KEYS[2])
return existed
"""

_REFRESH = """
if redis.call('PEXPIRE', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('SADD', KEYS[1], KEYS[2])
return 1
"""

_REWRITE = """
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[1], KEYS[2])
return 1
"""

_UP, _DOWN, _REWRITING = "up", "down", "rewriting"


def replica_name() -> str:
    """This process's name in the cluster: host, pid and a random suffix (a restarted pod
    with the same host name and pid is a new replica)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class RedisBudgets:
    """A :class:`lb.admission.BudgetStore` on Redis."""

    def __init__(self, config: ClusterConfig, metrics: Metrics,
                 replica: str | None = None) -> None:
        if config.redis_url is None:
            raise ValueError("[cluster] redis_url is unset")
        self.config = config
        self.replica = replica or replica_name()
        prefix = f"pdlb:{{{config.name}}}"
        self.members_key = f"{prefix}:replicas"
        self.lease_key = f"{prefix}:lease:{self.replica}"
        self._keys = [self.members_key, self.lease_key]
        self._ttl_ms = str(int(config.lease_ttl_s * 1000))
        self._timeout_s = config.timeout_ms / 1000
        self._state = _DOWN
        self._said_down = False
        self._helds: list[Callable[[], Mapping[str, int]]] = []
        """What each admission on this replica holds (one per model group)."""
        self._pending: dict[str, int] = {}
        self._flushing: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self.global_used: dict[str, int] = {}
        """Each stage's global use as the last reservation saw it."""
        self.reservations = 0
        self._fallbacks = Counter(
            "pdlb_cluster_fallback", "Times this replica lost Redis and went on with local"
            " accounting (each budget / [cluster] replicas).", registry=metrics.registry)
        metrics.gauge("pdlb_cluster_redis_up", "1 while the shared budgets on Redis answer;"
                      " 0 while this replica admits on its own share.", []).set_function(
                          lambda: 1.0 if self._state == _UP else 0.0)

    # -- the BudgetStore protocol -----------------------------------------------------------

    @property
    def shared(self) -> bool:
        return self._state == _UP

    @property
    def replicas(self) -> int:
        return self.config.replicas

    @property
    def poll_s(self) -> float:
        return self.config.poll_ms / 1000

    def follow(self, held: Callable[[], Mapping[str, int]]) -> None:
        """One more admission's holdings (each model group's stages have their own names)."""
        self._helds.append(held)

    def _held(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for held in self._helds:
            for name, tokens in held().items():
                out[name] = out.get(name, 0) + tokens
        return out

    async def reserve(self, need: Mapping[str, int],
                      limits: Mapping[str, int | None]) -> str | None:
        if self._state != _UP:
            raise StoreUnavailable("Redis is down")
        args: list[str | int] = [self._ttl_ms]
        for name, tokens in need.items():
            limit = limits.get(name)
            args += [name, tokens, -1 if limit is None else limit]
        answer = await self._call("reserve", args)
        self.reservations += 1
        status = answer[0].decode() if isinstance(answer[0], bytes) else str(answer[0])
        self.global_used = {name: int(v) for name, v in zip(need, answer[1:], strict=False)}
        return None if status == "ok" else status

    def adjust(self, deltas: Mapping[str, int]) -> None:
        if self._state == _DOWN:
            return  # the lease is rewritten from this replica's holdings when Redis is back
        for name, delta in deltas.items():
            if delta:
                self._pending[name] = self._pending.get(name, 0) + delta
        if self._state == _UP and self._pending and self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    @property
    def client(self) -> Any:
        """The redis-py asyncio client (None before :meth:`start`)."""
        return self._client

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    @property
    def cluster_name(self) -> str:
        """``[cluster] name``: the hash tag of every key (lb/tenants/redis_limits.py too)."""
        return self.config.name

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and write this replica's (empty) lease; Redis down at start-up is not an
        error — this replica starts on its local share and keeps asking."""
        # pdlb[cluster]; imported only when configured
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        url = self.config.redis_url or ""
        if self.config.tls and url.startswith("redis://"):
            url = "rediss://" + url.removeprefix("redis://")
        tls: dict[str, Any] = {}
        if url.startswith("rediss://") and self.config.tls_ca_file is not None:
            tls["ssl_ca_certs"] = self.config.tls_ca_file
        self._client = aioredis.Redis.from_url(
            url, password=self.config.password, socket_timeout=self._timeout_s,
            socket_connect_timeout=self._timeout_s, retry_on_timeout=False,
            health_check_interval=0, retry=Retry(NoBackoff(), 0),  # one try: ours to time
            **tls)
        for name, source in (("reserve", _RESERVE), ("adjust", _ADJUST),
                             ("refresh", _REFRESH), ("rewrite", _REWRITE)):
            self._scripts[name] = self._client.register_script(source)
        await self._rewrite()  # False: down, said once by _down
        self._task = asyncio.get_running_loop().create_task(self._keep())

    async def stop(self) -> None:
        """Stop refreshing and hand this replica's lease back (best effort, bounded)."""
        for task in (self._task, self._flushing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._client is not None:
            try:
                async with asyncio.timeout(self._timeout_s * 2):
                    await self._client.delete(self.lease_key)
                    await self._client.srem(self.members_key, self.lease_key)
            except Exception:
                pass
            await self._client.aclose()

    # -- inside -----------------------------------------------------------------------------

    async def _call(self, script: str, args: list[str | int]) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._scripts[script](keys=self._keys, args=args)
        except (TimeoutError, OSError, ConnectionError) as exc:
            self._down(f"{script}: {type(exc).__name__}: {exc}")
            raise StoreUnavailable(str(exc)) from exc
        except Exception as exc:  # redis.RedisError and its kin: not imported at module top
            if type(exc).__module__.startswith("redis"):
                self._down(f"{script}: {type(exc).__name__}: {exc}")
                raise StoreUnavailable(str(exc)) from exc
            raise

    def _down(self, why: str) -> None:
        self._state = _DOWN
        self._pending.clear()
        if self._said_down:
            return
        self._said_down = True
        self._fallbacks.inc()
        self._wake.set()
        log.warning("cluster: Redis %s: %s; admitting on this replica's share (budget / %d)"
                    " until it answers", self.config.redis_url, why, self.config.replicas)

    async def _rewrite(self) -> bool:
        """Make this replica's lease its current holdings; True when Redis took it."""
        self._state = _REWRITING
        self._pending.clear()
        held = self._held()
        args: list[str | int] = [self._ttl_ms]
        for name in sorted(held):
            args += [name, max(0, held[name])]
        if len(args) == 1:
            args += ["decode", 0]
        try:
            await self._call("rewrite", args)
        except StoreUnavailable:
            return False
        if self._state != _REWRITING:
            return False
        self._state = _UP
        self._said_down = False
        if self._pending and self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())
        return True

    async def _flush(self) -> None:
        try:
            while self._pending and self._state == _UP:
                batch, self._pending = self._pending, {}
                args: list[str | int] = [self._ttl_ms]
                for name, delta in batch.items():
                    args += [name, delta]
                try:
                    existed = await self._call("adjust", args)
                except StoreUnavailable:
                    return
                if not existed:  # the lease had expired: Redis forgot this replica
                    self._down("this replica's lease had expired")
                    return
        finally:
            self._flushing = None

    async def _keep(self) -> None:
        """Refresh the lease while up; ask Redis every second while down."""
        was_down_since: float | None = None if self._state == _UP else time.monotonic()
        while True:
            up = self._state == _UP
            interval = self.config.lease_ttl_s / 3 if up else min(1.0, self.config.lease_ttl_s / 3)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            if self._state == _UP:
                try:
                    alive = await self._call("refresh", [self._ttl_ms])
                except StoreUnavailable:
                    was_down_since = time.monotonic()
                    continue
                if not alive:
                    self._down("this replica's lease had expired")
                    was_down_since = time.monotonic()
            elif self._state == _DOWN:
                if was_down_since is None:
                    was_down_since = time.monotonic()
                quiet = not self._said_down  # never up since start-up: nothing to announce
                if await self._rewrite() and not quiet:
                    log.info("cluster: Redis %s answers again after %.1f s; budgets shared"
                             " again (this replica's lease rewritten)", self.config.redis_url,
                             time.monotonic() - was_down_since)
                    was_down_since = None
