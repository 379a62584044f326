"""Tenants end to end: pdlb in front of emulated prefill/decode servers on loopback, the
official openai client as one client and aiohttp for load. Limits are checked exactly (a
1 s requests window, a 30 s tokens window: nothing sleeps for a minute); fairness and
priority by structure — who succeeds, who is shed, who waited longer — never by a latency
bound (bench/tenants.py has the timings)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from emulator import EmulatorConfig, EmulatorServer
from tests.conftest import make_config

PROMPT = "Tell me a story about a load balancer that learned to be fair. " * 4
MAX_NEW = 120


@pytest.fixture
async def fleet() -> AsyncIterator[tuple[str, str]]:
    cfg: dict[str, Any] = {"time_scale": 20.0, "seed": 3}
    async with EmulatorServer(EmulatorConfig(role="prefill", **cfg)) as p, \
            EmulatorServer(EmulatorConfig(role="decode", **cfg)) as d:
        yield p.url, d.url


def pdlb_config(fleet: tuple[str, str], tenants: dict[str, Any], **extra: Any) -> Any:
    """One decode budget of ~4 requests, a 12-place line: saturated by a burst."""
    return make_config([fleet[0]], [fleet[1]], pools={
        "decode": {"max_inflight_tokens": 4 * 190, "max_queue": 12, "queue_timeout_s": 30.0}},
        tokenizer={"kind": "emulator"}, tenants=tenants, **extra)


async def post(http: aiohttp.ClientSession, url: str, key: str | None,
               headers: dict[str, str] | None = None, max_tokens: int = MAX_NEW
               ) -> tuple[int, dict[str, str], dict[str, Any]]:
    h = dict(headers or {})
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    body = {"model": "emulated-model", "prompt": PROMPT, "max_tokens": max_tokens}
    async with http.post(url + "/v1/completions", json=body, headers=h) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.json()


def metric(text: str, name: str, **labels: str) -> float:
    """A sample's value (0 when absent), whatever the order of its labels."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} ([0-9.e+-]+)$", text, re.M):
        if set(m.group(1).split(",")) == want:
            return float(m.group(2))
    return 0.0


async def test_limits_exact_headers_retry_after_and_true_up(fleet, start_pdlb) -> None:
    """10 requests at once against 3 per 1 s: exactly 3 pass; the 429s say so in OpenAI's
    shape, headers and Retry-After; after the window 3 pass again. The tokens window is
    charged prompt + max_tokens, then the real usage (short answers: EOS)."""
    async with EmulatorServer(EmulatorConfig(role="decode", time_scale=20.0, seed=3,
                                             eos_probability=0.1)) as short:
        url, _ = await start_pdlb(make_config([fleet[0]], [short.url], tokenizer={
            "kind": "emulator"}, tenants={
                "rps": {"api_keys": ["k-rps"], "requests": 3, "requests_window_s": 1.0},
                "tok": {"api_keys": ["k-tok"], "tokens": 1000, "tokens_window_s": 30.0}}))
        async with aiohttp.ClientSession() as http:
            answers = await asyncio.gather(*(post(http, url, "k-rps", max_tokens=4)
                                             for _ in range(10)))
            statuses = Counter(a[0] for a in answers)
            assert statuses == {200: 3, 429: 7}
            refused = next(a for a in answers if a[0] == 429)
            assert refused[2]["error"]["code"] == "rate_limit_exceeded"
            assert refused[2]["error"]["type"] == "requests"
            assert refused[1]["x-pdlb-reject-reason"] == "requests"
            assert refused[1]["x-ratelimit-limit-requests"] == "3"
            assert refused[1]["x-ratelimit-remaining-requests"] == "0"
            assert 1 <= int(refused[1]["retry-after"]) <= 1
            ok = [a for a in answers if a[0] == 200]
            assert sorted(a[1]["x-ratelimit-remaining-requests"] for a in ok) == ["0", "1", "2"]
            assert "x-ratelimit-limit-tokens" not in ok[0][1]  # no tokens limit: no header
            await asyncio.sleep(1.05)  # the whole window has passed
            again = await asyncio.gather(*(post(http, url, "k-rps", max_tokens=4)
                                           for _ in range(4)))
            assert Counter(a[0] for a in again) == {200: 3, 429: 1}

        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="k-tok",
                                      max_retries=0) as client:
            raw = await client.completions.with_raw_response.create(
                model="emulated-model", prompt=PROMPT, max_tokens=300)
            first = raw.parse()
            assert first.usage is not None
            p1, c1 = first.usage.prompt_tokens, first.usage.completion_tokens
            assert c1 < 300  # EOS came early: the true-up matters
            admitted1 = 1000 - int(raw.headers["x-ratelimit-remaining-tokens"])
            counted = admitted1 - 300  # pdlb's count of the prompt (usage may add a BOS)
            assert abs(counted - p1) <= 1
            assert raw.headers["x-ratelimit-limit-tokens"] == "1000"
            raw = await client.completions.with_raw_response.create(
                model="emulated-model", prompt=PROMPT, max_tokens=200)
            second = raw.parse()
            assert second.usage is not None
            # trued up: request 1 counts p1 + c1, request 2 as admitted (counted + 200)
            assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 1000 - (p1 + c1) - (
                counted + 200)
            left = 1000 - (p1 + c1) - second.usage.total_tokens  # both trued up now
            with pytest.raises(openai.RateLimitError) as info:
                await client.completions.create(model="emulated-model", prompt=PROMPT,
                                                max_tokens=left - counted + 1)  # one over
            headers = info.value.response.headers
            assert headers["x-pdlb-reject-reason"] == "tokens"
            assert 1 <= int(headers["retry-after"]) <= 30
            ok = await client.completions.create(model="emulated-model", prompt=PROMPT,
                                                 max_tokens=left - counted)  # just fits
            assert ok.usage is not None
            with pytest.raises(openai.RateLimitError):  # more than the window ever allows
                await client.completions.create(model="emulated-model", prompt=PROMPT,
                                                max_tokens=1001)


async def test_priority_header_rules(fleet, start_pdlb) -> None:
    """A key picks a class it is allowed (200), not another (403 permission_error), nor an
    unknown one (400); each answer is OpenAI-shaped."""
    url, _ = await start_pdlb(pdlb_config(fleet, {
        "gold": {"api_keys": ["k-gold"], "priorities": ["interactive", "batch"]},
        "bulk": {"api_keys": ["k-bulk"], "priority": "batch"}}))
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="k-gold",
                                  max_retries=0) as gold, \
            openai.AsyncOpenAI(base_url=url + "/v1", api_key="k-bulk", max_retries=0) as bulk:
        r = await gold.completions.create(model="emulated-model", prompt=PROMPT, max_tokens=2,
                                          extra_headers={"X-Priority": "batch"})
        assert r.choices
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await bulk.completions.create(model="emulated-model", prompt=PROMPT,
                                          max_tokens=2, extra_headers={"X-Priority":
                                                                       "interactive"})
        assert denied.value.code == "priority_not_allowed"
        with pytest.raises(openai.BadRequestError) as bad:
            await bulk.completions.create(model="emulated-model", prompt=PROMPT,
                                          max_tokens=2, extra_headers={"X-Priority": "vip"})
        assert bad.value.code == "invalid_priority"


async def contend(url: str, big: str, small: str, ticks: int = 6, gap_s: float = 0.15,
                  ) -> tuple[Counter[int], Counter[int], Counter[str], str]:
    """``big`` bursts 24 at once, then sends 10 per tick while ``small`` sends 1 per tick
    (``ticks`` ticks ``gap_s`` apart): 10x small's rate, well past what the fleet serves."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        big_tasks = [asyncio.create_task(post(http, url, big)) for _ in range(24)]
        small_tasks = []
        await asyncio.sleep(0.1)
        for _ in range(ticks):
            big_tasks += [asyncio.create_task(post(http, url, big)) for _ in range(10)]
            small_tasks.append(asyncio.create_task(post(http, url, small)))
            await asyncio.sleep(gap_s)
        small_answers = await asyncio.gather(*small_tasks)
        big_answers = await asyncio.gather(*big_tasks)
        async with http.get(url + "/metrics") as r:
            text = await r.text()
    reasons = Counter(a[1].get("x-pdlb-reject-reason", "") for a in big_answers if a[0] != 200)
    limited = {a[1].get("x-ratelimit-limit-requests") for a in big_answers}
    reasons.update(f"limit-header:{v}" for v in limited)
    return (Counter(a[0] for a in small_answers), Counter(a[0] for a in big_answers), reasons,
            text)


async def test_flooding_tenant_cannot_crowd_out_a_small_one(fleet, start_pdlb) -> None:
    """Two equal tenants, one sending 10x the other's rate at a fleet that runs ~4 at a time
    with a 12-place line: the small one's 6 all succeed (its arrivals push the flood's newest
    out, 429 ``shed``) and wait less in admission than the flood; the flood is refused beyond
    its share. Without tenants (FIFO), the same load refuses small requests (queue_full)."""
    url, _ = await start_pdlb(pdlb_config(fleet, {
        "big": {"api_keys": ["k-big"], "requests": 10_000},
        "small": {"api_keys": ["k-small"]}}))
    small, big, reasons, text = await contend(url, "k-big", "k-small")
    assert small == {200: 6}
    assert big[200] < 84 and big[429] > 0
    assert reasons["shed"] >= 1
    assert set(reasons) <= {"shed", "queue_full", "limit-header:10000"}
    assert reasons["limit-header:10000"] == 1  # on every answer, 200 and 429 alike
    waits = {t: metric(text, "pdlb_tenant_queue_wait_seconds_sum", tenant=t)
             / max(1.0, metric(text, "pdlb_tenant_queue_wait_seconds_count", tenant=t))
             for t in ("big", "small")}
    assert waits["small"] < waits["big"]
    assert metric(text, "pdlb_tenant_admitted_total", tenant="small", **{"class": "interactive"}
                  ) == 6
    assert metric(text, "pdlb_tenant_rejected_total", tenant="big", reason="shed") \
        == reasons["shed"]
    assert metric(text, "pdlb_tenant_tokens_total", tenant="small") > 6 * MAX_NEW

    fifo_url, _ = await start_pdlb(pdlb_config(fleet, {}))
    small, big, reasons, _ = await contend(fifo_url, "k-big", "k-small")
    assert small[429] >= 1  # FIFO: the full line refuses the small tenant too


async def test_batch_flood_does_not_hold_back_interactive(fleet, start_pdlb) -> None:
    """A batch tenant floods (as above); interactive requests arriving meanwhile all
    succeed, are admitted ahead of the waiting batch (they wait less), and batch is shed for
    them."""
    url, _ = await start_pdlb(pdlb_config(fleet, {
        "batch": {"api_keys": ["k-batch"], "priority": "batch"},
        "app": {"api_keys": ["k-app"]}}, tenancy={"aging_s": 30.0}))
    inter, batch, reasons, text = await contend(url, "k-batch", "k-app")
    assert inter == {200: 6}
    assert batch[429] > 0 and reasons["shed"] >= 1
    waits = {t: metric(text, "pdlb_tenant_queue_wait_seconds_sum", tenant=t)
             / max(1.0, metric(text, "pdlb_tenant_queue_wait_seconds_count", tenant=t))
             for t in ("batch", "app")}
    assert waits["app"] < waits["batch"]
    assert metric(text, "pdlb_tenant_admitted_total", tenant="batch", **{"class": "batch"}) \
        == batch[200]


async def test_anonymous_tenant_and_trusted_header(fleet, start_pdlb, caplog) -> None:
    """No key: the anonymous tenant's limits; a trusted header names a tenant; the access
    line names each request's tenant, refused ones too."""
    caplog.set_level(logging.INFO, logger="pdlb.access")
    url, _ = await start_pdlb(pdlb_config(fleet, {
        "anonymous": {"requests": 1, "requests_window_s": 30.0},
        "team": {"requests": 2, "requests_window_s": 30.0}}, tenancy={"header": "X-Tenant"}))
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        assert (await post(http, url, None, max_tokens=2))[0] == 200
        status, headers, _ = await post(http, url, "unknown-key", max_tokens=2)
        assert status == 429 and headers["x-ratelimit-limit-requests"] == "1"
        assert 28 <= int(headers["retry-after"]) <= 30
        team = [await post(http, url, None, {"X-Tenant": "team"}, 2) for _ in range(3)]
        assert [s for s, _, _ in team] == [200, 200, 429]
    assert time.monotonic() - started < 25  # the windows were never waited out
    lines = [r.getMessage() for r in caplog.records if r.name == "pdlb.access"]
    tenants = [re.search(r" tenant=(\S+) status=(\d+)", line).groups()  # type: ignore[union-attr]
               for line in lines]
    assert tenants == [("anonymous", "200"), ("anonymous", "429"), ("team", "200"),
                       ("team", "200"), ("team", "429")]


async def test_client_leaving_gives_the_tenant_its_slot_back(fleet, start_pdlb) -> None:
    """A tenant limited to 1 request in flight: its client leaving while queued in
    admission, or mid-stream, frees the slot (the next request is admitted, not 429), and
    pdlb's counters return to zero (the fixture checks)."""
    url, _ = await start_pdlb(make_config([fleet[0]], [fleet[1]], pools={
        "decode": {"max_inflight_tokens": 600, "max_queue": 4, "queue_timeout_s": 10.0}},
        tokenizer={"kind": "emulator"}, tenants={
            "one": {"api_keys": ["k-one"], "concurrent": 1}, "hog": {"api_keys": ["k-hog"]}}))
    body = {"model": "emulated-model", "prompt": PROMPT, "max_tokens": 400, "stream": True}
    async with aiohttp.ClientSession() as http:
        async def hold() -> None:  # takes the whole decode budget for a while
            async with http.post(url + "/v1/completions", json=body,
                                 headers={"Authorization": "Bearer k-hog"}) as r:
                await r.read()

        hog = asyncio.create_task(hold())
        await asyncio.sleep(0.1)
        queued = asyncio.create_task(post(http, url, "k-one"))
        await asyncio.sleep(0.2)
        assert not queued.done()  # waiting in admission's line
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        await hog
        async with http.post(url + "/v1/completions", json=body,
                             headers={"Authorization": "Bearer k-one"}) as r:
            assert r.status == 200
            await r.content.readany()  # first bytes, then leave mid-stream
        await asyncio.sleep(0.2)
        status, headers, _ = await post(http, url, "k-one", max_tokens=2)
        assert status == 200, headers
