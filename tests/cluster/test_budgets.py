"""RedisBudgets and Admission together, in one process, against a real redis-server: two
Admission objects stand for two replicas sharing one budget."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lb.admission import Admission
from lb.backends.cluster import RedisBudgets
from lb.config import ClusterConfig
from lb.errors import Overloaded
from lb.metrics import Metrics
from tests.cluster.redis_server import RedisServer
from tests.conftest import make_config


def replica(url: str, decode_budget: int = 1000, **cluster: Any
            ) -> tuple[Admission, RedisBudgets, Metrics]:
    config = make_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"], pools={
        "decode": {"max_inflight_tokens": decode_budget, "queue_timeout_s": 0.5}})
    metrics = Metrics()
    options = {"redis_url": url, "replicas": 2, "lease_ttl_s": 1.0, "timeout_ms": 200.0,
               **cluster}
    store = RedisBudgets(ClusterConfig(**options), metrics)
    return Admission(config.pools, metrics, store), store, metrics


async def test_two_replicas_share_one_budget(redis_server: RedisServer) -> None:
    """What one replica holds counts against the other's admissions (503 after the queue
    timeout when it does not fit; admitted at once when it does)."""
    a, sa, _ = replica(redis_server.url)
    b, sb, _ = replica(redis_server.url)
    await sa.start()
    await sb.start()
    try:
        assert sa.shared and sb.shared
        t1 = await a.admit(0, 700)
        with pytest.raises(Overloaded) as info:
            await b.admit(0, 400)  # 700 + 400 > 1000: waits, then 503
        assert info.value.status == 503
        t2 = await b.admit(0, 300)  # 700 + 300 = 1000 fits
        assert sb.global_used["decode"] == 1000
        t1.release()
        t2.release()
        await asyncio.sleep(0.1)  # the releases are sent in the background
        t3 = await a.admit(0, 1000)
        assert sa.global_used["decode"] == 1000
        t3.release()
    finally:
        await sa.stop()
        await sb.stop()


async def test_waiter_admitted_when_the_other_replica_releases(
        redis_server: RedisServer) -> None:
    """A request blocked by another replica's tokens is admitted within a poll after they
    are released there."""
    a, sa, _ = replica(redis_server.url)
    b, sb, _ = replica(redis_server.url)
    await sa.start()
    await sb.start()
    try:
        t1 = await a.admit(0, 900)
        waiter = asyncio.ensure_future(b.admit(0, 200))
        await asyncio.sleep(0.1)
        assert not waiter.done()
        t1.release()
        t2 = await asyncio.wait_for(waiter, 1)
        assert b.admitted_tokens("decode") == 200
        t2.release()
    finally:
        await sa.stop()
        await sb.stop()


async def test_a_dead_replica_tokens_come_back_after_the_ttl(redis_server: RedisServer) -> None:
    """A replica that stops refreshing (as if killed) frees its tokens once its lease
    expires."""
    a, sa, _ = replica(redis_server.url)
    b, sb, _ = replica(redis_server.url)
    await sa.start()
    await sb.start()
    try:
        await a.admit(0, 900)  # never released: the replica "dies" holding it
        assert sa._task is not None
        sa._task.cancel()  # no more refreshes
        with pytest.raises(Overloaded):
            await b.admit(0, 500)
        await asyncio.sleep(1.1)  # lease_ttl_s = 1
        ticket = await b.admit(0, 500)
        ticket.release()
    finally:
        await sb.stop()
        await sa.stop()


async def test_redis_down_local_share_then_shared_again(tmp_path: Any) -> None:
    """Redis stopped: admission goes on with budget / replicas, the up gauge reads 0 and
    the fallback counter 1; Redis back: the lease is rewritten from what is held."""
    server = RedisServer(tmp_path)
    server.start()
    a, sa, metrics = replica(server.url)
    await sa.start()
    try:
        held = await a.admit(0, 300)
        server.stop()
        with pytest.raises(Overloaded):  # noticed on this call; then local share 500
            t = await a.admit(0, 100)
            t.release()
            await a.admit(0, 300)  # 300 + 300 > 500
        assert not sa.shared
        text = metrics.render().decode()
        assert "pdlb_cluster_redis_up 0.0" in text
        assert "pdlb_cluster_fallback_total 1.0" in text
        server.start()
        for _ in range(100):
            if sa.shared:
                break
            await asyncio.sleep(0.05)
        assert sa.shared
        assert "pdlb_cluster_redis_up 1.0" in metrics.render().decode()
        t = await a.admit(0, 100)
        assert sa.global_used["decode"] == 400  # the rewritten 300 + this 100
        t.release()
        held.release()
    finally:
        await sa.stop()
        server.stop()


async def test_shared_waiters_keep_their_order(redis_server: RedisServer) -> None:
    """On one replica, a small request that would fit does not overtake a bigger one
    already waiting for the shared budget (FIFO, as without a cluster); both are admitted,
    in order, once the other replica releases."""
    a, sa, _ = replica(redis_server.url)
    b, sb, _ = replica(redis_server.url)
    await sa.start()
    await sb.start()
    try:
        held = await a.admit(0, 900)
        order: list[str] = []

        async def wait(name: str, tokens: int) -> None:
            ticket = await b.admit(0, tokens)
            order.append(name)
            ticket.release()

        big = asyncio.ensure_future(wait("big", 200))
        await asyncio.sleep(0.05)
        small = asyncio.ensure_future(wait("small", 50))  # 900 + 50 fits, but waits its turn
        await asyncio.sleep(0.1)
        assert order == []
        held.release()
        await asyncio.wait_for(asyncio.gather(big, small), 1)
        assert order == ["big", "small"]
    finally:
        await sa.stop()
        await sb.stop()


async def test_redis_slow_is_redis_down(tmp_path: Any) -> None:
    """Redis frozen (SIGSTOP): an admission answers within about timeout_ms on the local
    share instead of hanging; thawed (SIGCONT): shared again within the retry interval."""
    import os
    import signal
    import time

    server = RedisServer(tmp_path)
    server.start()
    a, sa, metrics = replica(server.url, timeout_ms=100.0)
    await sa.start()
    try:
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        ticket = await a.admit(0, 100)
        took = time.monotonic() - started
        assert took < 0.5, took
        assert not sa.shared
        assert "pdlb_cluster_fallback_total 1.0" in metrics.render().decode()
        os.kill(server.proc.pid, signal.SIGCONT)
        for _ in range(100):
            if sa.shared:
                break
            await asyncio.sleep(0.05)
        assert sa.shared
        ticket.release()
    finally:
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGCONT)
        await sa.stop()
        server.stop()


async def test_password(tmp_path: Any) -> None:
    """A Redis that requires a password: the right one shares the budget; a wrong one is
    Redis down (local share, no error at start-up)."""
    server = RedisServer(tmp_path, "--requirepass", "s3cret")
    server.start()
    good, sgood, _ = replica(server.url, password="s3cret")
    bad, sbad, _ = replica(server.url, password="wrong")
    await sgood.start()
    await sbad.start()
    try:
        assert sgood.shared and not sbad.shared
        (await good.admit(0, 100)).release()
        (await bad.admit(0, 100)).release()
    finally:
        await sgood.stop()
        await sbad.stop()
        server.stop()
