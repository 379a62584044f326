"""Three ``pdlb serve`` processes sharing one 20,000-token decode budget through a real
redis-server, flooded through all three at once: the sum of what they have admitted never
exceeds the budget by more than one request; a replica killed with SIGKILL gives its tokens
back within the lease TTL; Redis stopped mid-flood fails no request, and the budget is
shared again once it is back. Sampling is bounded in time; nothing asserts a latency."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from emulator import EmulatorCluster
from tests.cluster.redis_server import RedisServer

pytestmark = pytest.mark.slow

BUDGET = 20_000
PROMPT = 1_850
MAX_NEW = 150
NEED = PROMPT + MAX_NEW  # one request's decode tokens
TTL_S = 2.0
ADMITTED = re.compile(rb'^pdlb_admitted_tokens\{stage="decode"\} ([0-9.e+-]+)$', re.M)
REDIS_UP = re.compile(rb"^pdlb_cluster_redis_up ([0-9.]+)$", re.M)
SUM_LEASES = """
local total = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  total = total + (tonumber(redis.call('HGET', key, 'decode')) or 0)
end
return total
"""


@dataclass
class Replica:
    url: str
    proc: asyncio.subprocess.Process
    log: Path


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    samples: list[tuple[float, int, int | None]] = field(default_factory=list)
    """(time, sum of the replicas' pdlb_admitted_tokens, Redis's sum of the leases)."""
    per_replica: list[list[int]] = field(default_factory=list)


def config_text(prefill: str, decode: str, redis_url: str) -> str:
    return f"""
[pools.prefill]
backends = [{{ url = "{prefill}" }}]
[pools.decode]
backends = [{{ url = "{decode}" }}]
max_inflight_tokens = {BUDGET}
max_queue = 200
queue_timeout_s = 20
[cluster]
redis_url = "{redis_url}"
replicas = 3
lease_ttl_s = {TTL_S}
timeout_ms = 200
[log]
access = false
"""


@contextlib.asynccontextmanager
async def replicas(config: Path, workdir: Path, count: int = 3) -> AsyncIterator[list[Replica]]:
    started: list[Replica] = []
    try:
        for i in range(count):
            log = workdir / f"pdlb-{i}.log"
            with log.open("wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "lb.cli", "serve", "--config", str(config),
                    "--port", "0", "--log-level", "info", stdout=asyncio.subprocess.PIPE,
                    stderr=err)
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line.startswith("pdlb listening on "), (line, log.read_text())
            started.append(Replica(line.split()[-1], proc, log))
        yield started
    finally:
        for r in started:
            if r.proc.returncode is None:
                r.proc.terminate()
        for r in started:
            try:
                await asyncio.wait_for(r.proc.wait(), 10)
            except TimeoutError:
                r.proc.kill()
                await r.proc.wait()


async def admitted(http: aiohttp.ClientSession, r: Replica) -> tuple[int, bool]:
    async with http.get(r.url + "/metrics") as resp:
        body = await resp.read()
    m, up = ADMITTED.search(body), REDIS_UP.search(body)
    assert m is not None and up is not None
    return int(float(m.group(1))), up.group(1) == b"1.0"


async def sampler(http: aiohttp.ClientSession, live: list[Replica], redis: object,
                  tally: Tally, stop: asyncio.Event) -> None:
    while not stop.is_set():
        views = await asyncio.gather(*(admitted(http, r) for r in list(live)),
                                     return_exceptions=True)
        total = sum(v[0] for v in views if isinstance(v, tuple))
        tally.per_replica.append([v[0] if isinstance(v, tuple) else -1 for v in views])
        in_redis: int | None = None
        with contextlib.suppress(Exception):
            in_redis = int(await asyncio.wait_for(
                redis.eval(SUM_LEASES, 1, "pdlb:{pdlb}:replicas"), 0.2))  # type: ignore[attr-defined]
        tally.samples.append((time.monotonic(), total, in_redis))
        await asyncio.sleep(0.05)


async def client(http: aiohttp.ClientSession, r: Replica, tally: Tally, until: float,
                 seed: int) -> None:
    prompt = [(seed * 31 + i * 7) % 9000 + 10 for i in range(PROMPT)]
    while time.monotonic() < until and r.proc.returncode is None:
        try:
            async with http.post(r.url + "/v1/completions", json={
                    "model": "emulated-model", "prompt": prompt, "max_tokens": MAX_NEW,
                    "ignore_eos": True}) as resp:
                await resp.read()
                reason = resp.headers.get("X-Pdlb-Reject-Reason", "")
                tally.statuses[f"{resp.status} {reason}".strip()] += 1
                if resp.status != 200:
                    await asyncio.sleep(0.05)
        except (TimeoutError, aiohttp.ClientError):
            tally.statuses[f"connection error ({r.url})"] += 1
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def fleet(tmp_path: Path, redis_server: RedisServer
                ) -> AsyncIterator[tuple[list[Replica], aiohttp.ClientSession, object]]:
    import redis.asyncio as aioredis

    async with EmulatorCluster(prefill=1, decode=1, mode="subprocess", seed=3) as emulators:
        config = tmp_path / "pdlb.toml"
        config.write_text(config_text(emulators.prefill_urls[0], emulators.decode_urls[0],
                                      redis_server.url))
        redis = aioredis.Redis.from_url(redis_server.url)
        async with replicas(config, tmp_path) as live, aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=60)) as http:
            try:
                yield live, http, redis
            finally:
                await redis.aclose()


async def flood(http: aiohttp.ClientSession, live: list[Replica], tally: Tally,
                seconds: float, per_replica: int = 8) -> list[asyncio.Task[None]]:
    until = time.monotonic() + seconds
    return [asyncio.ensure_future(client(http, r, tally, until, i * 100 + j))
            for i, r in enumerate(live) for j in range(per_replica)]


def over_budget(tally: Tally, since: float = 0.0) -> tuple[int, int]:
    """The largest sampled sum of the replicas' admitted tokens, and Redis's."""
    local = max((s[1] for s in tally.samples if s[0] >= since), default=0)
    shared = max((s[2] or 0 for s in tally.samples if s[0] >= since), default=0)
    return local, shared


async def test_three_replicas_one_budget(tmp_path: Path, redis_server: RedisServer) -> None:
    """Flooded through all three replicas, the admitted sum stays within the budget plus
    one request, and the budget is used (the flood saturates it)."""
    async with fleet(tmp_path, redis_server) as (live, http, redis):
        tally, stop = Tally(), asyncio.Event()
        sampling = asyncio.ensure_future(sampler(http, live, redis, tally, stop))
        clients = await flood(http, live, tally, 6.0)
        await asyncio.gather(*clients)
        stop.set()
        await sampling
        local, shared = over_budget(tally)
        print(f"samples={len(tally.samples)} max local sum={local} max redis sum={shared}"
              f" statuses={dict(tally.statuses)}")
        assert local <= BUDGET + NEED, local
        assert shared <= BUDGET + NEED, shared
        assert local >= BUDGET - 2 * NEED, f"the flood never filled the budget: {local}"
        assert set(tally.statuses) <= {"200", "503 queue_timeout"}, tally.statuses
        assert tally.statuses["200"] > 0


async def test_killed_replica_gives_its_tokens_back(tmp_path: Path,
                                                    redis_server: RedisServer) -> None:
    """kill -9 of a replica holding tokens: its lease leaves Redis within the TTL, and the
    survivors admit into the freed room."""
    async with fleet(tmp_path, redis_server) as (live, http, redis):
        tally = Tally()
        clients = await flood(http, live, tally, 8.0)
        victim = live[2]
        for _ in range(100):
            held, _ = await admitted(http, victim)
            if held > 0:
                break
            await asyncio.sleep(0.05)
        assert held > 0
        leases_before = {k.decode() for k in await redis.smembers("pdlb:{pdlb}:replicas")}  # type: ignore[attr-defined]
        victim.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await victim.proc.wait()
        survivors = live[:2]
        gone = None
        while time.monotonic() - killed_at < TTL_S + 2.0:
            leases = {k.decode() for k in await redis.smembers("pdlb:{pdlb}:replicas")}  # type: ignore[attr-defined]
            alive = [k for k in leases_before if await redis.exists(k)]  # type: ignore[attr-defined]
            if len(alive) == 2:
                gone = time.monotonic() - killed_at
                break
            await asyncio.sleep(0.05)
        assert gone is not None, f"the killed replica's lease outlived TTL: {leases}"
        assert gone <= TTL_S + 0.5, gone
        # The survivors now hold (nearly) the whole budget: the dead one's share came back.
        best = 0
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            views = [await admitted(http, r) for r in survivors]
            best = max(best, sum(v[0] for v in views))
            if best >= BUDGET - 2 * NEED:
                break
            await asyncio.sleep(0.05)
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        print(f"lease gone {gone:.2f} s after SIGKILL; survivors held {best}; {dict(tally.statuses)}")
        assert best >= BUDGET - 2 * NEED, best
        assert not [k for k in tally.statuses if k.startswith("connection error")
                    and victim.url not in k], tally.statuses


async def test_redis_stopped_mid_flood(tmp_path: Path, redis_server: RedisServer) -> None:
    """Redis killed mid-flood: no request fails (admission's own 503s aside), each replica
    says so once; Redis back: every replica shares the budget again and the admitted sum
    stays within budget + one request."""
    async with fleet(tmp_path, redis_server) as (live, http, redis):
        tally, stop = Tally(), asyncio.Event()
        sampling = asyncio.ensure_future(sampler(http, live, redis, tally, stop))
        clients = await flood(http, live, tally, 13.0)
        await asyncio.sleep(2.0)
        redis_server.stop()
        down_at = time.monotonic()
        await asyncio.sleep(4.0)
        views = [await admitted(http, r) for r in live]
        assert not any(up for _, up in views), views
        down_local = max(s[1] for s in tally.samples if s[0] > down_at + 0.5)
        # Once what was admitted under the shared budget has drained, each replica holds
        # at most its share (budget / 3) — the local accounting.
        drained = [per for s, per in zip(tally.samples, tally.per_replica, strict=False)
                   if down_at + 3.0 < s[0]]
        redis_server.start()
        back_at = time.monotonic()
        while time.monotonic() - back_at < 5.0:
            views = [await admitted(http, r) for r in live]
            if all(up for _, up in views):
                break
            await asyncio.sleep(0.1)
        assert all(up for _, up in views), views
        shared_again = time.monotonic()
        await asyncio.gather(*clients)
        stop.set()
        await sampling
        local, shared = over_budget(tally, since=shared_again + 0.5)
        print(f"down: max local sum {down_local}; after: max local {local} redis {shared};"
              f" back after {shared_again - back_at:.2f} s; {dict(tally.statuses)}")
        assert set(tally.statuses) <= {"200", "503 queue_timeout"}, tally.statuses
        assert drained and all(max(per) <= BUDGET // 3 for per in drained), drained
        assert local <= BUDGET + NEED and shared <= BUDGET + NEED
        assert shared >= BUDGET - 3 * NEED, "the leases were not rewritten after the restart"
        for r in live:
            text = r.log.read_text()
            assert text.count("admitting on this replica's share") == 1, text
            assert text.count("budgets shared again") == 1, text
