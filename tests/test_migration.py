"""Stream migration on emulated vLLM: a decode that dies mid-stream, the client's stream goes on.

The emulator's ``drop_after_chunks`` fault closes a decode's connection after N data events
(no ``[DONE]``), on every stream it serves; ``kill -9`` of an emulator process is the real
thing. Each check reads the client's stream as a strict SSE parser would: one ``id``,
``created`` and ``model`` throughout, one role chunk (chat), exactly ``max_tokens`` tokens,
one usage (when asked) counting the original prompt, ``[DONE]`` once and last. The
start_pdlb fixture checks every in-flight counter is back to zero afterwards.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from emulator import EmulatorConfig, EmulatorServer
from emulator.cluster import EmulatorCluster
from tests.conftest import make_config

pytestmark = pytest.mark.timeout(120)
MODEL = "emulated-model"
PROMPT = "The quick brown fox jumps over the lazy dog. " * 12
NO_EJECT = {"interval_s": 5.0, "timeout_s": 0.5, "failures_to_eject": 1000}


@dataclass
class Seen:
    """One streamed answer as the client saw it."""

    ids: set[str] = field(default_factory=set)
    created: set[int] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    roles: int = 0
    tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: list[str] = field(default_factory=list)
    usages: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    done: int = 0
    after_done: int = 0


async def read_stream(http: aiohttp.ClientSession, url: str, endpoint: str,
                      body: dict[str, Any]) -> Seen:
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    seen = Seen()
    async with asyncio.timeout(30), http.post(url + path, json=body) as r:
        assert r.status == 200, await r.text()
        raw = await r.read()
    for event in raw.split(b"\n\n"):
        if not event.strip():
            continue
        assert event.startswith(b"data: "), event
        payload = event[6:]
        if seen.done:
            seen.after_done += 1
        if payload == b"[DONE]":
            seen.done += 1
            continue
        chunk = orjson.loads(payload)
        if "error" in chunk:
            seen.errors.append(chunk["error"])
            continue
        seen.ids.add(chunk["id"])
        seen.created.add(chunk["created"])
        seen.models.add(chunk["model"])
        if chunk.get("usage") is not None:
            seen.usages.append(chunk["usage"])
        for choice in chunk["choices"]:
            assert choice["index"] == 0
            if endpoint == "chat":
                delta = choice["delta"]
                if "role" in delta:
                    seen.roles += 1
                text = delta.get("content") or ""
                if text or choice.get("finish_reason"):
                    seen.tokens += 1
            else:
                text = choice["text"]
                seen.tokens += 1
            seen.text += text
            seen.token_ids += choice.get("token_ids") or []
            if choice.get("finish_reason"):
                seen.finish.append(choice["finish_reason"])
    return seen


def assert_whole(seen: Seen, endpoint: str, max_tokens: int, prompt_tokens: int | None,
                 usage: bool) -> None:
    """One well-formed stream: one id, one role chunk, max_tokens tokens, one usage, [DONE]."""
    assert not seen.errors, seen.errors
    assert len(seen.ids) == 1 and len(seen.created) == 1 and seen.models == {MODEL}
    assert seen.roles == (1 if endpoint == "chat" else 0)
    assert seen.tokens == max_tokens
    assert seen.finish == ["length"]
    assert seen.done == 1 and seen.after_done == 0
    if usage:
        assert len(seen.usages) == 1, seen.usages
        (u,) = seen.usages
        assert u["completion_tokens"] == max_tokens
        assert prompt_tokens is None or u["prompt_tokens"] == prompt_tokens
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    else:
        assert not seen.usages


@pytest.fixture
async def emulators() -> AsyncIterator[tuple[EmulatorServer, EmulatorServer, EmulatorServer]]:
    cfg = {"time_scale": 50.0, "seed": 11}
    async with EmulatorServer(EmulatorConfig(role="prefill", **cfg)) as p, \
            EmulatorServer(EmulatorConfig(role="decode", **cfg)) as d1, \
            EmulatorServer(EmulatorConfig(role="decode", **cfg)) as d2:
        yield p, d1, d2


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def set_faults(http: aiohttp.ClientSession, url: str, **faults: Any) -> None:
    async with http.post(url + "/_emulator/faults", json=faults) as r:
        assert r.status == 200, await r.text()


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name))


async def prompt_count(http: aiohttp.ClientSession, url: str, endpoint: str,
                       body: dict[str, Any]) -> int:
    """The prompt's tokens as an uninterrupted run reports them."""
    one = {**body, "stream": False, "max_tokens": 1}
    one.pop("stream_options", None)
    one.pop("max_completion_tokens", None)
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    async with http.post(url + path, json=one) as r:
        assert r.status == 200
        return int((await r.json())["usage"]["prompt_tokens"])


def body_for(endpoint: str, max_tokens: int, usage: bool, token_ids: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "stream": True}
    if endpoint == "completions":
        body["prompt"] = PROMPT
    else:
        body["messages"] = [{"role": "user", "content": PROMPT}]
    if usage:
        body["stream_options"] = {"include_usage": True}
    if token_ids:
        body["return_token_ids"] = True
    return body


async def test_every_cut_point_continues_into_one_whole_stream(emulators, start_pdlb, http):
    """Both decodes cut every stream after N events (N varied): each request migrates as
    often as it must and the client still gets one whole stream of exactly max_tokens."""
    p, d1, d2 = emulators
    url, _ = await start_pdlb(make_config([p.url], [d1.url, d2.url], health=NO_EJECT,
                                          resilience={"migrate_attempts": 40}))
    rng = random.Random(5)
    prompts = {e: await prompt_count(http, url, e, body_for(e, 1, False, False))
               for e in ("completions", "chat")}
    cases = 0
    for cut in (2, 3, 5, 8, 13):
        for d in (d1, d2):
            await set_faults(http, d.url, drop_after_chunks=cut)
        jobs = []
        for endpoint in ("completions", "chat"):
            for usage in (False, True):
                for ids in (False, True):
                    max_tokens = rng.randint(cut + 1, 30)
                    body = body_for(endpoint, max_tokens, usage, ids)
                    jobs.append((endpoint, body))
        seen = await asyncio.gather(*(read_stream(http, url, e, b) for e, b in jobs))
        for (endpoint, body), s in zip(jobs, seen, strict=True):
            assert_whole(s, endpoint, body["max_tokens"], prompts[endpoint],
                         "stream_options" in body)
            if body.get("return_token_ids"):
                assert len(s.token_ids) == body["max_tokens"]
            cases += 1
    assert cases == 40
    assert await metric(http, url, 'pdlb_migrations_total{outcome="migrated"}') >= 40
    assert await metric(http, url, "pdlb_migration_regenerated_tokens_total") > 0
    assert await metric(http, url, 'pdlb_stream_errors_total') == 0


async def test_openai_client_reads_a_migrated_stream(emulators, start_pdlb, http):
    """The official client sees one ordinary stream across a cut."""
    p, d1, d2 = emulators
    url, _ = await start_pdlb(make_config([p.url], [d1.url, d2.url], health=NO_EJECT))
    await set_faults(http, d1.url, drop_after_chunks=4)
    await set_faults(http, d2.url, drop_after_chunks=None)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        for _ in range(4):  # whichever decode the policy picks first, some of them migrate
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=12,
                stream=True, stream_options={"include_usage": True})
            ids, text, usage, roles = set(), "", None, 0
            async for chunk in stream:
                ids.add(chunk.id)
                for choice in chunk.choices:
                    roles += choice.delta.role is not None
                    text += choice.delta.content or ""
                usage = chunk.usage or usage
            assert len(ids) == 1 and roles == 1 and text
            assert usage is not None and usage.completion_tokens == 12
    assert await metric(http, url, 'pdlb_migrations_total{outcome="migrated"}') >= 1


async def test_disabled_or_out_of_attempts_ends_with_the_error_event(emulators, start_pdlb,
                                                                     http):
    """migrate_attempts = 0, or every attempt used up: today's SSE error event + [DONE]."""
    p, d1, d2 = emulators
    for d in (d1, d2):
        await set_faults(http, d.url, drop_after_chunks=3)
    for attempts, legs in ((0, 1), (1, 2), (2, 3)):
        url, _ = await start_pdlb(make_config([p.url], [d1.url, d2.url], health=NO_EJECT,
                                              resilience={"migrate_attempts": attempts}))
        s = await read_stream(http, url, "completions", body_for("completions", 20, True, False))
        assert len(s.errors) == 1 and s.done == 1 and s.after_done == 0
        assert s.errors[0]["code"] in ("truncated_stream", "backend_connection_lost")
        assert s.tokens == 3 * legs and len(s.ids) == 1 and not s.usages
        exhausted = await metric(http, url, 'pdlb_migrations_total{outcome="exhausted"}')
        assert exhausted == (1 if attempts else 0)


async def test_cases_not_continued_end_with_the_error_event(emulators, start_pdlb, http):
    """echo (a request the table refuses) keeps today's ending, counted as refused."""
    p, d1, d2 = emulators
    for d in (d1, d2):
        await set_faults(http, d.url, drop_after_chunks=3)
    url, _ = await start_pdlb(make_config([p.url], [d1.url, d2.url], health=NO_EJECT))
    body = {**body_for("completions", 10, False, False), "echo": True}
    s = await read_stream(http, url, "completions", body)
    assert len(s.errors) == 1 and s.done == 1 and s.tokens == 3
    assert await metric(http, url, 'pdlb_migrations_total{outcome="refused"}') == 1


async def test_a_stream_cut_after_its_last_token_only_gets_its_end(emulators, start_pdlb,
                                                                   http):
    """Cut right after the finishing chunk: no continuation, the owed usage and [DONE]."""
    p, d1, d2 = emulators
    url, _ = await start_pdlb(make_config([p.url], [d1.url, d2.url], health=NO_EJECT))
    body = body_for("completions", 5, True, False)
    prompt = await prompt_count(http, url, "completions", body)
    for d in (d1, d2):
        await set_faults(http, d.url, drop_after_chunks=5)
    s = await read_stream(http, url, "completions", body)
    assert_whole(s, "completions", 5, prompt, usage=True)
    assert await metric(http, url, 'pdlb_migrations_total{outcome="finished"}') == 1


async def test_non_streamed_answers_survive_a_dropping_decode(emulators, start_pdlb, http):
    """A non-streamed decode that drops its connection is retried whole: complete answers."""
    p, d1, d2 = emulators
    await set_faults(http, d1.url, drop_after_chunks=0)
    url, _ = await start_pdlb(make_config([p.url], [d1.url, d2.url], health=NO_EJECT))
    for endpoint in ("completions", "chat"):
        body = body_for(endpoint, 9, False, False)
        body["stream"] = False
        path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
        for _ in range(4):
            async with http.post(url + path, json=body) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["usage"]["completion_tokens"] == 9


async def test_kill_9_a_decode_mid_stream_and_every_stream_completes(start_pdlb, http):
    """A real kill -9 of a decode process mid-stream: every stream completes elsewhere."""
    async with EmulatorCluster(prefill=1, decode=2, mode="subprocess", time_scale=10.0,
                               seed=3) as cluster:
        url, _ = await start_pdlb(make_config(
            cluster.prefill_urls, cluster.decode_urls,
            health={"interval_s": 0.2, "timeout_s": 1.0, "failures_to_eject": 2}))
        jobs = [("completions" if i % 2 else "chat", body_for(
            "completions" if i % 2 else "chat", 2000, True, bool(i % 3))) for i in range(10)]
        tasks = [asyncio.create_task(read_stream(http, url, e, b)) for e, b in jobs]
        await asyncio.sleep(0.8)
        cluster.processes[1].kill()  # the first decode server (processes: prefill first)
        seen = await asyncio.gather(*tasks)
        for (endpoint, _), s in zip(jobs, seen, strict=True):
            assert_whole(s, endpoint, 2000, None, usage=True)
        assert await metric(http, url, 'pdlb_migrations_total{outcome="migrated"}') >= 1


@pytest.mark.parametrize("connector", ["nixl_push", "p2p_nccl", "sglang", "decode_only"])
async def test_every_handshake_mode_migrates(connector, start_pdlb, http):
    """Concurrent (nixl_push, sglang), decode-first (p2p_nccl) and decode-only requests
    continue the same way as the sequential NIXL path above."""
    from tests.connectors.kvpd import emulators as kv_emulators
    from tests.connectors.kvpd import pd_config

    mode = "nixl" if connector == "decode_only" else connector
    async with kv_emulators(mode, 1, 2, time_scale=50.0) as (ps, ds):
        extra: dict[str, Any] = {"resilience": {"migrate_attempts": 30}}
        if connector == "decode_only":
            extra["resilience"]["direct_decode_below_tokens"] = 10**6
        url, _ = await start_pdlb(pd_config(mode, ps, ds, **extra))
        prompts = {e: await prompt_count(http, url, e, body_for(e, 1, False, False))
                   for e in ("completions", "chat")}
        for d in ds:
            await set_faults(http, d.url, drop_after_chunks=4)
        jobs = [(e, body_for(e, 14, True, ids)) for e in ("completions", "chat")
                for ids in (False, True)]
        seen = await asyncio.gather(*(read_stream(http, url, e, b) for e, b in jobs))
        for (endpoint, _), s in zip(jobs, seen, strict=True):
            assert_whole(s, endpoint, 14, prompts[endpoint], usage=True)
        assert await metric(http, url, 'pdlb_migrations_total{outcome="migrated"}') >= 4


async def test_a_decode_that_breaks_before_its_first_event_is_resent_whole(emulators,
                                                                             start_pdlb, http):
    """Head sent, then the connection closed: the request goes again, one role chunk."""
    p, d1, d2 = emulators
    await set_faults(http, d1.url, drop_after_chunks=0)
    url, _ = await start_pdlb(make_config([p.url], [d1.url, d2.url], health=NO_EJECT))
    for endpoint in ("completions", "chat", "completions", "chat"):
        s = await read_stream(http, url, endpoint, body_for(endpoint, 7, True, True))
        assert_whole(s, endpoint, 7, None, usage=True)
    assert await metric(http, url, 'pdlb_migrations_total{outcome="migrated"}') >= 1


async def test_a_continuation_that_cannot_start_ends_with_the_error_event(emulators,
                                                                          start_pdlb, http):
    """The continuation refused on its way in (here: its longer prompt is over
    max_prompt_tokens): the SSE error event and [DONE], counted as failed."""
    p, d1, d2 = emulators
    body = {**body_for("completions", 20, True, True), "prompt": [7] * 50}
    url, _ = await start_pdlb(make_config(
        [p.url], [d1.url, d2.url], health=NO_EJECT,
        server={"port": 0, "max_prompt_tokens": 52}))
    for d in (d1, d2):
        await set_faults(http, d.url, drop_after_chunks=5)
    s = await read_stream(http, url, "completions", body)
    assert s.tokens == 5 and len(s.errors) == 1 and s.done == 1 and s.after_done == 0
    assert s.errors[0]["code"] == "prompt_too_long"
    assert await metric(http, url, 'pdlb_migrations_total{outcome="failed"}') == 1
