"""Per-backend in-flight numbers shared through Redis (``[cluster] share_loads``): a
least-loaded policy on one replica sees what another replica has in flight."""

from __future__ import annotations

from pathlib import Path

from lb.backends.cluster import RedisBudgets
from lb.backends.pool import Pool
from lb.backends.shared_loads import SharedLoads
from lb.config import ClusterConfig
from lb.metrics import Metrics
from policies.base import RouteRequest
from policies.registry import build_policy
from tests.cluster.redis_server import RedisServer
from tests.conftest import make_config

URLS = ["http://127.0.0.1:1", "http://127.0.0.1:2"]


def replica(url: str) -> tuple[RedisBudgets, dict[str, Pool], SharedLoads]:
    config = make_config(["http://127.0.0.1:9"], URLS)
    metrics = Metrics()
    budgets = RedisBudgets(ClusterConfig(redis_url=url, replicas=2, timeout_ms=200.0), metrics)
    pools = {name: Pool(pc, build_policy("least_tokens", {}, pool=name), metrics)
             for name, pc in config.pools.items()}
    return budgets, pools, SharedLoads(budgets, pools, 0.05)


def request() -> RouteRequest:
    return RouteRequest(request_id="r", leg="decode", endpoint="completions", model="m",
                        prompt_tokens=10, max_tokens=10, session_key=None)


async def test_least_tokens_sees_the_other_replica(redis_server: RedisServer,
                                                   tmp_path: Path) -> None:
    """Replica A holds 5,000 tokens on backend 0, replica B 1,000 on backend 1: B's
    least_tokens picks backend 1 once it has read A's numbers, backend 0 without them (and
    again after Redis is gone)."""
    ba, pa, la = replica(redis_server.url)
    bb, pb, lb_ = replica(redis_server.url)
    await ba.start()
    await bb.start()
    try:
        da, db = pa["decode"], pb["decode"]
        with da.lease(da.backends[0], 5000), db.lease(db.backends[1], 1000):
            assert await lb_.once()  # B publishes first: A's numbers not there yet
            assert db.pick(request()).url == URLS[0]
            assert await la.once() and await lb_.once()
            assert (db.backends[0].others_tokens, db.backends[0].others_requests) == (5000, 1)
            assert da.backends[1].others_tokens == 1000
            assert db.pick(request()).url == URLS[1]
            redis_server.stop()
            assert not await lb_.once()
            assert db.backends[0].others_tokens == 0
            assert db.pick(request()).url == URLS[0]
    finally:
        await ba.stop()
        await bb.stop()
