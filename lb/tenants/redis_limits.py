"""Tenants' limits shared by every replica through Redis (``[cluster] redis_url``).

The same three limits as lb/tenants/limits.py, kept in Redis so that they hold for the
whole fleet: one Lua script per request (one round trip, atomic) checks and takes a request
and its tokens from the tenant's exact sliding windows and one from its in-flight count; a
second one, sent off the request path, ends the request (in-flight down, tokens trued up).
Redis's own clock (``TIME``) stamps the windows, so replicas' clocks do not matter.

Keys, per tenant, under the cluster's hash tag: ``...:tenant:<name>:req`` (sorted set of
request ids by time), ``:tok`` (the same for tokens) with ``:tokn`` (id → tokens), and
``:live`` (replica lease key → requests in flight there). A replica killed with SIGKILL
leaves its in-flight count behind until its lease (lb/backends/cluster.py) expires; the next
check then drops it.

The connection is the budgets' (:class:`lb.backends.cluster.RedisBudgets`, seen through
the :class:`Budgets` protocol); while it is down
each replica enforces ``limit / replicas`` on its own (:class:`LocalLimits`), as for budgets.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from lb.tenants.config import TenantConfig
from lb.tenants.limits import LocalLimits, RateLimited, Taken, duration

log = logging.getLogger("pdlb.tenants")

_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, tokens = ARGV[1], tonumber(ARGV[2])
local rl, rs = tonumber(ARGV[3]), tonumber(ARGV[4])
local tl, ts = tonumber(ARGV[5]), tonumber(ARGV[6])
local cl, lease = tonumber(ARGV[7]), ARGV[8]
local rused, tused, live = 0, 0, 0
if rl >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - rs)
  rused = redis.call('ZCARD', KEYS[1])
end
if tl >= 0 then
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ts)
  if #old > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ts)
    redis.call('HDEL', KEYS[3], unpack(old))
  end
  for _, v in ipairs(redis.call('HVALS', KEYS[3])) do tused = tused + tonumber(v) end
end
if cl >= 0 then
  local all = redis.call('HGETALL', KEYS[4])
  for i = 1, #all, 2 do
    if all[i] == lease or redis.call('EXISTS', all[i]) == 1 then
      live = live + tonumber(all[i + 1])
    else
      redis.call('HDEL', KEYS[4], all[i])
    end
  end
end
local status, retry = 'ok', 0
if cl >= 0 and live >= cl then
  status, retry = 'concurrent', 1000
elseif rl >= 0 and rused + 1 > rl then
  local e = redis.call('ZRANGE', KEYS[1], rused - rl, rused - rl, 'WITHSCORES')
  status, retry = 'requests', tonumber(e[2]) + rs - now
elseif tl >= 0 and tused + tokens > tl then
  status = 'tokens'
  local excess = tused + tokens - tl
  local ids = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #ids, 2 do
    excess = excess - (tonumber(redis.call('HGET', KEYS[3], ids[i])) or 0)
    if excess <= 0 then retry = tonumber(ids[i + 1]) + ts - now; break end
  end
end
if status == 'ok' then
  if rl >= 0 then
    redis.call('ZADD', KEYS[1], now, id); redis.call('PEXPIRE', KEYS[1], rs)
    rused = rused + 1
  end
  if tl >= 0 then
    redis.call('ZADD', KEYS[2], now, id); redis.call('HSET', KEYS[3], id, tokens)
    redis.call('PEXPIRE', KEYS[2], ts); redis.call('PEXPIRE', KEYS[3], ts)
    tused = tused + tokens
  end
  if cl >= 0 then redis.call('HINCRBY', KEYS[4], lease, 1) end
end
local rreset, treset = 0, 0
if rl >= 0 then
  local e = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if #e > 0 then rreset = tonumber(e[2]) + rs - now end
end
if tl >= 0 then
  local e = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  if #e > 0 then treset = tonumber(e[2]) + ts - now end
end
return {status, retry, rused, rreset, tused, treset}
"""

_FINISH = """
if ARGV[4] == '1' then
  if redis.call('HINCRBY', KEYS[3], ARGV[3], -1) <= 0 then redis.call('HDEL', KEYS[3], ARGV[3]) end
end
if tonumber(ARGV[2]) >= 0 and redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
return 1
"""


class Budgets(Protocol):
    """What these limits use of :class:`lb.backends.cluster.RedisBudgets` (a Protocol: the
    shared concepts import no wing, tests/test_architecture.py)."""

    @property
    def shared(self) -> bool: ...
    @property
    def replicas(self) -> int: ...
    @property
    def client(self) -> Any: ...
    @property
    def timeout_s(self) -> float: ...
    @property
    def cluster_name(self) -> str: ...

    replica: str
    lease_key: str


class _Shared:
    """What one request took on Redis."""

    __slots__ = ("_limits", "_tenant", "headers", "id")

    def __init__(self, limits: RedisLimits, tenant: TenantConfig, id: str,
                 headers: Mapping[str, str]) -> None:
        self._limits = limits
        self._tenant = tenant
        self.id = id
        self.headers = headers

    def finish(self, real_tokens: int | None) -> None:
        self._limits.finish(self._tenant, self.id, real_tokens)


class RedisLimits:
    def __init__(self, tenants: Mapping[str, TenantConfig], budgets: Budgets) -> None:
        self._budgets = budgets
        self._fallback = LocalLimits(tenants, budgets.replicas)
        self._prefix = f"pdlb:{{{budgets.cluster_name}}}:tenant:"
        self._ids = itertools.count()
        self._scripts: dict[str, Any] = {}
        self._pending: set[asyncio.Task[None]] = set()

    def _keys(self, tenant: str) -> list[str]:
        p = self._prefix + tenant
        return [p + ":req", p + ":tok", p + ":tokn", p + ":live"]

    def _script(self, name: str, source: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self._budgets.client.register_script(source)
        return script

    async def take(self, tenant: TenantConfig, tokens: int) -> Taken | _Shared:
        """As :meth:`LocalLimits.take`, for the whole fleet (this replica's share of each
        limit while Redis does not answer)."""
        budgets = self._budgets
        if not budgets.shared or budgets.client is None:
            return self._fallback.take(tenant.name, tokens)
        if tenant.tokens is not None and tokens > tenant.tokens:  # never fits: no round trip
            raise RateLimited(tenant.name, "tokens", f"this request needs {tokens} tokens but"
                              f" tenant {tenant.name!r} may use at most {tenant.tokens} per"
                              f" {tenant.tokens_window_s:g} s; lower max_tokens or shorten the"
                              " prompt", tenant.tokens_window_s, {})
        id = f"{budgets.replica}:{next(self._ids)}"
        args = [id, tokens,
                -1 if tenant.requests is None else tenant.requests,
                int(tenant.requests_window_s * 1000),
                -1 if tenant.tokens is None else tenant.tokens,
                int(tenant.tokens_window_s * 1000),
                -1 if tenant.concurrent is None else tenant.concurrent,
                budgets.lease_key]
        try:
            async with asyncio.timeout(budgets.timeout_s):
                answer = await self._script("take", _TAKE)(keys=self._keys(tenant.name),
                                                           args=args)
        except Exception as exc:  # Redis down or slow: this replica's share, as for budgets
            log.debug("tenants: Redis take failed (%s); local share", exc)
            return self._fallback.take(tenant.name, tokens)
        status = answer[0].decode() if isinstance(answer[0], bytes) else str(answer[0])
        retry_ms, rused, rreset_ms, tused, treset_ms = (int(v) for v in answer[1:6])
        retry_s, rreset, treset = retry_ms / 1000, rreset_ms / 1000, treset_ms / 1000
        headers: dict[str, str] = {}
        if tenant.requests is not None:
            headers["x-ratelimit-limit-requests"] = str(tenant.requests)
            headers["x-ratelimit-remaining-requests"] = str(max(0, tenant.requests - rused))
            headers["x-ratelimit-reset-requests"] = duration(rreset)
        if tenant.tokens is not None:
            headers["x-ratelimit-limit-tokens"] = str(tenant.tokens)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, tenant.tokens - tused))
            headers["x-ratelimit-reset-tokens"] = duration(treset)
        if status == "ok":
            return _Shared(self, tenant, id, headers)
        name = tenant.name
        what = {"requests": f"{tenant.requests} requests per {tenant.requests_window_s:g} s",
                "tokens": f"{tenant.tokens} tokens per {tenant.tokens_window_s:g} s",
                "concurrent": f"{tenant.concurrent} requests in flight"}[status]
        raise RateLimited(name, status, f"rate limit of tenant {name!r} (whole fleet): {what};"
                          f" retry in {max(retry_s, 0.001):.3g} s", retry_s, headers)

    def finish(self, tenant: TenantConfig, id: str, real_tokens: int | None) -> None:
        """Off the request path: one script call, errors only logged (a lost decrement
        lasts until the lease does; a lost true-up until the window passes)."""
        args = [id, -1 if real_tokens is None or tenant.tokens is None else real_tokens,
                self._budgets.lease_key, 1 if tenant.concurrent is not None else 0]
        keys = self._keys(tenant.name)[1:]  # tok (unused by the script), tokn, live

        async def send() -> None:
            try:
                async with asyncio.timeout(self._budgets.timeout_s * 5):
                    await self._script("finish", _FINISH)(keys=keys, args=args)
            except Exception as exc:
                log.debug("tenants: Redis finish failed: %s", exc)

        task = asyncio.get_running_loop().create_task(send())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
