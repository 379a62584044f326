"""Admission control: budgets, FIFO waiting, 429/503/413, and exact refunds."""

from __future__ import annotations

import asyncio

import pytest

from lb.admission import Admission
from lb.config import parse_config
from lb.errors import Overloaded, PayloadTooLarge
from lb.metrics import Metrics


def admission(prefill: int | None, decode: int | None, max_queue: int = 10,
              timeout: float = 1.0) -> Admission:
    pools = {}
    for name, limit in (("prefill", prefill), ("decode", decode)):
        table = {"backends": ["http://a:1"], "max_queue": max_queue, "queue_timeout_s": timeout}
        if limit is not None:
            table["max_inflight_tokens"] = limit
        pools[name] = table
    return Admission(parse_config({"pools": pools}, "<t>").pools, Metrics())


async def test_unlimited_admits_everything_and_refunds():
    a = admission(None, None)
    t = await a.admit(10**6, 10**7)
    assert a.admitted_tokens("prefill") == 10**6
    t.release()
    assert a.admitted_tokens("prefill") == 0 and a.admitted_tokens("decode") == 0


async def test_too_large_is_413_at_once():
    a = admission(100, 1000)
    with pytest.raises(PayloadTooLarge):
        await a.admit(101, 200)
    with pytest.raises(PayloadTooLarge):
        await a.admit(10, 1001)


async def test_decode_saturation_blocks_new_prefills_until_release():
    """Rate matching: no new prefill starts while decode has no room for its KV."""
    a = admission(1000, 300)
    first = await a.admit(100, 200)
    waiter = asyncio.create_task(a.admit(100, 200))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    first.release("prefill")  # prefill done: decode still holds its KV
    await asyncio.sleep(0.05)
    assert not waiter.done()
    first.release()
    second = await asyncio.wait_for(waiter, 1)
    assert a.admitted_tokens("decode") == 200
    second.release()
    assert a.admitted_tokens("decode") == 0 and a.admitted_tokens("prefill") == 0


async def test_queue_full_is_429_with_stage_and_timeout_is_503():
    a = admission(100, None, max_queue=1, timeout=0.2)
    held = await a.admit(100, 100)
    waiting = asyncio.create_task(a.admit(50, 50))
    await asyncio.sleep(0.02)
    with pytest.raises(Overloaded) as full:
        await a.admit(50, 50)
    assert full.value.status == 429 and full.value.stage == "prefill"
    assert full.value.headers()["X-Pdlb-Saturated-Stage"] == "prefill"
    assert "Retry-After" in full.value.headers()
    with pytest.raises(Overloaded) as late:
        await waiting
    assert late.value.status == 503 and late.value.reason == "queue_timeout"
    held.release()
    assert a.admitted_tokens("prefill") == 0


async def test_fifo_order_and_cancelled_waiter_is_forgotten():
    a = admission(100, None)
    held = await a.admit(100, 0)
    order: list[str] = []

    async def wait(name: str, tokens: int) -> None:
        t = await a.admit(tokens, 0)
        order.append(name)
        t.release()

    big = asyncio.create_task(wait("big", 90))
    await asyncio.sleep(0.01)
    gone = asyncio.create_task(wait("gone", 5))
    small = asyncio.create_task(wait("small", 5))
    await asyncio.sleep(0.01)
    gone.cancel()
    held.release()
    await asyncio.gather(big, small)
    assert order == ["big", "small"]
    assert a.admitted_tokens("prefill") == 0


async def test_resize_corrects_the_estimate():
    a = admission(None, None)
    t = await a.admit(10, 20)
    t.resize("decode", 35)
    assert a.admitted_tokens("decode") == 35
    t.release()
    assert a.admitted_tokens("decode") == 0
