"""``pdlb serve --workers N``: several processes on one port."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import pytest

from lb.serve.workers import share
from tests.conftest import make_config
from tests.fake_vllm import FakeBehaviour, make_fake, run_app

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("cluster", [{}, {"redis_url": "redis://127.0.0.1:1"}])
def test_share_divides_what_each_worker_enforces_alone(cluster):
    """Queues and concurrency are per worker: divided. The pools' token budgets are shared
    (Redis with [cluster], else the workers' file: tests/test_worker_budgets.py): whole, or
    the shared total would be budget / workers."""
    cfg = make_config(["http://a:1"], ["http://b:1"],
                      pools={"decode": {"max_inflight_tokens": 1001, "max_queue": 10}},
                      server={"port": 0, "max_concurrent_requests": 7},
                      **({"cluster": cluster} if cluster else {}))
    part = share(cfg, 2)
    assert part.decode.max_inflight_tokens == 1001 and part.decode.max_queue == 5
    assert part.server.max_concurrent_requests == 4
    assert part.prefill.max_inflight_tokens is None
    assert share(cfg, 1) == cfg


async def test_two_workers_serve_one_port_and_stop_together():
    p, d = FakeBehaviour(), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lb.cli", "serve", "--prefill", pu, "--decode", du,
            "--port", "0", "--workers", "2", "--log-level", "warning",
            stdout=asyncio.subprocess.PIPE, cwd=REPO)
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert "(2 workers" in line
            url = line.split()[3]
            async with aiohttp.ClientSession() as http:
                for _ in range(30):
                    # a fresh connection each time, so the kernel may pick either worker
                    async with http.post(url + "/v1/completions",
                                         json={"prompt": "x", "max_tokens": 1},
                                         headers={"Connection": "close"}) as r:
                        assert r.status == 200
            assert len(p.requests) == 30
            pgrep = await asyncio.create_subprocess_exec(
                "pgrep", "-P", str(proc.pid), stdout=asyncio.subprocess.PIPE)
            children, _ = await pgrep.communicate()
            assert len(children.split()) == 2  # two worker processes

            proc.terminate()
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def _running(pid: int) -> bool:
    """Alive and not a zombie (/proc is memory, not disk: reading it does not block)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_workers_die_with_a_killed_parent():
    """SIGKILL on the parent leaves no orphaned worker behind."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lb.cli", "serve", "--prefill", "http://127.0.0.1:9",
        "--decode", "http://127.0.0.1:9", "--port", "0", "--workers", "2",
        "--log-level", "error", stdout=asyncio.subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None
    await asyncio.wait_for(proc.stdout.readline(), 30)
    pgrep = await asyncio.create_subprocess_exec(
        "pgrep", "-P", str(proc.pid), stdout=asyncio.subprocess.PIPE)
    children = [int(p) for p in (await pgrep.communicate())[0].split()]
    assert len(children) == 2
    proc.kill()
    await proc.wait()
    for _ in range(100):
        alive = [p for p in children if _running(p)]
        if not alive:
            break
        await asyncio.sleep(0.05)
    assert not alive, f"orphaned workers: {alive}"
