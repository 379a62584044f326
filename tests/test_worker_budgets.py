"""``pdlb serve --workers N`` without ``[cluster]``: one set of budgets, shared through a file."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lb.admission import Admission
from lb.backends import local_budgets
from lb.backends.local_budgets import WorkerBudgets
from lb.metrics import Metrics
from lb.serve.workers import share
from tests.conftest import make_config
from tests.fake_vllm import FakeBehaviour, make_fake, run_app

REPO = Path(__file__).resolve().parent.parent
LIMITS = {"prefill": None, "decode": 100}


def _pair(tmp_path: Path, ttl_s: float = 2.0) -> tuple[WorkerBudgets, WorkerBudgets]:
    path = tmp_path / local_budgets.FILE_NAME
    local_budgets.create(path, 2)
    return WorkerBudgets(path, 0, ttl_s=ttl_s), WorkerBudgets(path, 1, ttl_s=ttl_s)


def test_two_workers_reserve_up_to_the_limit_together(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    try:
        assert a.reserve_now({"prefill": 5, "decode": 60}, LIMITS) is None
        assert b.reserve_now({"prefill": 5, "decode": 40}, LIMITS) is None  # exactly 100
        assert b.reserve_now({"prefill": 0, "decode": 1}, LIMITS) == "decode"
        assert a.reserve_now({"prefill": 0, "decode": 1}, LIMITS) == "decode"
        assert a.global_used == {"prefill": 10, "decode": 100}
        assert a.held() == {"prefill": 5, "decode": 60}  # a refusal adds nothing
        a.adjust({"decode": -60})  # a releases: the room is b's to take
        assert b.reserve_now({"prefill": 0, "decode": 60}, LIMITS) is None
        assert b.held() == {"prefill": 5, "decode": 100}
        assert a.reserve_now({"prefill": 0, "decode": 1}, LIMITS) == "decode"
        b.adjust({"prefill": -5, "decode": -100})
        a.adjust({"prefill": -5})
        assert a.reserve_now({"prefill": 0, "decode": 100}, LIMITS) is None
        assert a.global_used == {"prefill": 0, "decode": 100}
    finally:
        a.close()
        b.close()


def test_a_stale_slot_stops_counting_after_the_ttl(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, ttl_s=0.2)
    try:
        assert b.reserve_now({"prefill": 0, "decode": 90}, LIMITS) is None
        assert a.reserve_now({"prefill": 0, "decode": 20}, LIMITS) == "decode"
        time.sleep(0.3)  # b's heartbeat is older than the TTL: b died (or stalled)
        assert a.reserve_now({"prefill": 0, "decode": 20}, LIMITS) is None
        assert a.global_used["decode"] == 20
        b.adjust({"decode": -90})  # b was alive after all: its write refreshes its heartbeat
        assert b.reserve_now({"prefill": 0, "decode": 80}, LIMITS) is None
        assert a.reserve_now({"prefill": 0, "decode": 1}, LIMITS) == "decode"
    finally:
        a.close()
        b.close()


async def test_the_heartbeat_keeps_a_live_slot_counted(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, ttl_s=0.2)
    await b.start()
    try:
        assert b.reserve_now({"prefill": 0, "decode": 90}, LIMITS) is None
        await asyncio.sleep(0.5)  # longer than the TTL, but b's task keeps beating
        assert a.reserve_now({"prefill": 0, "decode": 20}, LIMITS) == "decode"
    finally:
        await b.stop()
        a.close()
        b.close()


def test_the_parent_clears_an_exited_workers_slot(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    try:
        assert b.reserve_now({"prefill": 0, "decode": 100}, LIMITS) is None
        local_budgets.clear_slot(tmp_path / local_budgets.FILE_NAME, 1)
        assert a.reserve_now({"prefill": 0, "decode": 100}, LIMITS) is None
    finally:
        a.close()
        b.close()


def test_a_file_without_the_workers_slot_is_refused(tmp_path: Path) -> None:
    path = tmp_path / local_budgets.FILE_NAME
    local_budgets.create(path, 2)
    with pytest.raises(ValueError, match="no slot for worker 2"):
        WorkerBudgets(path, 2)


async def test_admission_waits_for_tokens_another_worker_frees(tmp_path: Path) -> None:
    """Two Admissions (two workers) on one file: the second waits, polling every poll_s,
    until the first releases; its line is bounded by max_queue."""
    a_store, b_store = _pair(tmp_path)
    cfg = make_config(["http://p:1"], ["http://d:1"],
                      pools={"decode": {"max_inflight_tokens": 100, "max_queue": 1,
                                        "queue_timeout_s": 5}})
    a = Admission(cfg.pools, Metrics(), a_store)
    b = Admission(cfg.pools, Metrics(), b_store)
    try:
        held = await a.admit(10, 80)
        first = asyncio.create_task(b.admit(10, 30))
        await asyncio.sleep(0.05)
        assert not first.done()  # 80 + 30 > 100: waits for worker a
        with pytest.raises(Exception, match="queue is full"):
            await b.admit(1, 1)  # max_queue 1 on this worker
        started = time.monotonic()
        held.release()  # in worker a; b has no local release to wake on: it polls
        ticket = await asyncio.wait_for(first, 1)
        assert time.monotonic() - started < 0.5
        assert b_store.held() == {"prefill": 10, "decode": 30}
        ticket.release()
        assert a_store.held() == b_store.held() == {"prefill": 0, "decode": 0}
    finally:
        a_store.close()
        b_store.close()


def test_share_keeps_the_token_budgets_whole_without_cluster() -> None:
    cfg = make_config(["http://a:1"], ["http://b:1"],
                      pools={"decode": {"max_inflight_tokens": 1001, "max_queue": 10}},
                      server={"port": 0, "max_concurrent_requests": 7})
    part = share(cfg, 2)
    assert part.decode.max_inflight_tokens == 1001  # enforced across workers by the file
    assert part.decode.max_queue == 5  # queues are per worker
    assert part.server.max_concurrent_requests == 4
    clustered = make_config(["http://a:1"], ["http://b:1"],
                            pools={"decode": {"max_inflight_tokens": 1001}},
                            cluster={"redis_url": "redis://127.0.0.1:1"})
    assert share(clustered, 2).decode.max_inflight_tokens == 1001  # shared through Redis


def _admitted(text: str) -> tuple[int, int]:
    """(sum of pdlb_admitted_tokens{stage="decode"} over the workers, how many series)."""
    total = series = 0
    for family in text_string_to_metric_families(text):
        if family.name == "pdlb_admitted_tokens":
            for s in family.samples:
                if s.labels.get("stage") == "decode" and "worker" in s.labels:
                    total += int(s.value)
                    series += 1
    return total, series


async def test_two_workers_share_one_decode_budget(tmp_path: Path) -> None:
    """A flood through the shared port: the workers together never hold more than the
    decode budget (sampled from /metrics during the flood), the rest waits or is shed."""
    budget = 400
    per_request = 7 + 50  # the fake's prompt estimate is small; max_tokens 50 dominates
    p, d = FakeBehaviour(), FakeBehaviour(chunk_delay_s=0.004)
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        config = tmp_path / "pdlb.toml"
        config.write_text(
            f'[server]\nport = 0\n[[pools.prefill.backends]]\nurl = "{pu}"\n'
            f'[[pools.decode.backends]]\nurl = "{du}"\n'
            f"[pools.decode]\nmax_inflight_tokens = {budget}\nmax_queue = 20\n"
            "queue_timeout_s = 0.5\n")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lb.cli", "serve", "--config", str(config),
            "--workers", "2", "--log-level", "warning",
            stdout=asyncio.subprocess.PIPE, cwd=REPO, env={**os.environ})
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert "(2 workers" in line
            url = line.split()[3]
            statuses: list[int] = []
            samples: list[int] = []
            done = asyncio.Event()
            async with aiohttp.ClientSession() as http:

                async def one() -> None:
                    async with http.post(url + "/v1/completions",
                                         json={"prompt": "x", "max_tokens": 50,
                                               "stream": True},
                                         headers={"Connection": "close"}) as r:
                        await r.read()
                        statuses.append(r.status)

                async def scrape() -> None:
                    while not done.is_set():
                        async with http.get(url + "/metrics",
                                            headers={"Connection": "close"}) as r:
                            total, series = _admitted(await r.text())
                        if series == 2:
                            samples.append(total)
                        await asyncio.sleep(0.01)

                scraper = asyncio.create_task(scrape())
                await asyncio.gather(*(one() for _ in range(80)))
                done.set()
                await scraper
                assert set(statuses) <= {200, 429, 503}, statuses
                assert statuses.count(200) >= budget // per_request
                assert samples and max(samples) > 0
                # a scrape reads the workers one after the other: one request's worth of slack
                assert max(samples) <= budget + per_request, max(samples)
                # more than budget / 2 per worker would allow: the budget is one, not two halves
                assert max(samples) > 2 * (budget // 2 // per_request) * per_request, samples
                async with http.get(url + "/metrics") as r:
                    assert _admitted(await r.text()) == (0, 2)
            proc.terminate()
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
