"""Many models behind one pdlb (lb/serve/models.py): ``[models."<name>"]`` groups with pools
of their own, aliases, a default model, LoRA adapters from the backends' /v1/models, and
404 ``model_not_found`` without touching a backend. Real pdlb, real emulators (one pair per
model; the emulator lists LoRA adapters and loads them at run time as vLLM does), the
official openai client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from emulator import EmulatorConfig, EmulatorServer
from emulator.app import state_of
from lb.config import parse_config
from lb.errors import ConfigError
from lb.serve.app import ROUTER

HEALTH = {"interval_s": 0.1, "timeout_s": 0.5}


def completions_seen(server: EmulatorServer) -> list[dict[str, Any]]:
    return [r["body"] for r in state_of(server.app)["recent_requests"]
            if r["path"] in ("/v1/completions", "/v1/chat/completions")]


@contextlib.asynccontextmanager
async def pair(model: str, seed: int, **extra: Any
               ) -> AsyncIterator[tuple[EmulatorServer, EmulatorServer]]:
    async with EmulatorServer(EmulatorConfig(role="prefill", model=model, seed=seed,
                                             **extra)) as p, \
            EmulatorServer(EmulatorConfig(role="decode", model=model, seed=seed,
                                          **extra)) as d:
        yield p, d


def two_models(a: tuple[EmulatorServer, EmulatorServer],
               b: tuple[EmulatorServer, EmulatorServer], **extra: Any) -> dict[str, Any]:
    return {
        "server": {"port": 0, **extra.pop("server", {})},
        "health": HEALTH,
        "models": {
            "alpha": {"served_name": "alpha-served", "aliases": ["a"],
                      "pools": {"prefill": {"backends": [a[0].url]},
                                "decode": {"backends": [a[1].url]}}},
            "beta": {"pools": {"prefill": {"backends": [b[0].url]},
                               "decode": {"backends": [b[1].url]}}},
        },
        **extra,
    }


@pytest.fixture
async def oai() -> AsyncIterator[Any]:
    """Factory: the official client for a pdlb URL; closed after the test."""
    clients: list[openai.AsyncOpenAI] = []

    def make(url: str) -> openai.AsyncOpenAI:
        clients.append(openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0))
        return clients[-1]

    yield make
    for c in clients:
        await c.close()


async def metrics_of(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
        text = await r.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


async def test_each_model_reaches_only_its_own_pools(start_pdlb, oai):
    async with pair("alpha-served", 1) as a, pair("beta", 2) as b:
        url, app = await start_pdlb(parse_config(two_models(a, b), "<test>"))
        client = oai(url)
        for asked, served, owner, other in (("alpha", "alpha-served", a, b),
                                            ("a", "alpha-served", a, b),
                                            ("alpha-served", "alpha-served", a, b),
                                            ("beta", "beta", b, a)):
            before = [len(completions_seen(s)) for s in (*owner, *other)]
            answer = await client.completions.create(model=asked, prompt="hello there",
                                                     max_tokens=3)
            assert answer.model == served and answer.usage is not None
            assert answer.usage.completion_tokens == 3
            after = [len(completions_seen(s)) for s in (*owner, *other)]
            assert [x - y for x, y in zip(after, before, strict=True)] == [1, 1, 0, 0], asked
            # what the backends got names the model they serve
            assert completions_seen(owner[0])[-1]["model"] == served
            assert completions_seen(owner[1])[-1]["model"] == served
        chat = await client.chat.completions.create(
            model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in chat]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2
        assert {c.model for c in chunks} == {"beta"}

        samples = await metrics_of(url)
        for pool in ("alpha/prefill", "alpha/decode", "beta/prefill", "beta/decode"):
            assert ("pdlb_pool_usable_backends", frozenset({("pool", pool)})) in samples
            assert ("pdlb_admitted_tokens", frozenset({("stage", pool)})) in samples
        ok = {(dict(labels)["model"], dict(labels)["endpoint"]): v
              for (name, labels), v in samples.items()
              if name == "pdlb_model_requests_total" and dict(labels)["status"] == "200"}
        assert ok == {("alpha-served", "completions"): 3, ("beta", "completions"): 1,
                      ("beta", "chat"): 1}
        assert len(app[ROUTER].groups) == 2


async def test_unknown_model_is_404_without_touching_a_backend(start_pdlb, oai):
    async with pair("alpha-served", 1) as a, pair("beta", 2) as b:
        url, _ = await start_pdlb(parse_config(two_models(a, b), "<test>"))
        client = oai(url)
        with pytest.raises(openai.NotFoundError) as info:
            await client.completions.create(model="gamma", prompt="hi", max_tokens=2)
        error = info.value.body
        assert isinstance(error, dict)
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert error["type"] == "invalid_request_error" and "gamma" in error["message"]
        # two models, no default: the request must name one
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/completions",
                                 json={"prompt": "hi", "max_tokens": 2}) as r:
                assert r.status == 400
                assert (await r.json())["error"]["code"] == "model_required"
            # pass-through routes judge the model too
            async with http.post(url + "/tokenize", json={"model": "gamma", "prompt": "x"}) as r:
                assert r.status == 404
                assert (await r.json())["error"]["code"] == "model_not_found"
        assert all(not completions_seen(s) for s in (*a, *b))
        samples = await metrics_of(url)
        assert samples[("pdlb_model_requests_total", frozenset(
            {("model", "other"), ("endpoint", "completions"), ("status", "404")}))] == 1


async def test_default_model_and_pass_through_follow_the_model(start_pdlb, oai):
    async with pair("alpha-served", 1) as a, pair("beta", 2) as b:
        config = parse_config(two_models(a, b, server={"default_model": "beta"}), "<test>")
        url, _ = await start_pdlb(config)
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/completions",
                                 json={"prompt": "hi", "max_tokens": 2}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["model"] == "beta"
            assert len(completions_seen(b[1])) == 1 and not completions_seen(a[1])
            # /tokenize goes to the model's own prefill pool, the alias rewritten
            async with http.post(url + "/tokenize", json={"model": "a", "prompt": "x y"}) as r:
                assert r.status == 200, await r.text()
            seen = [r for r in state_of(a[0].app)["recent_requests"] if r["path"] == "/tokenize"]
            assert [r["body"]["model"] for r in seen] == ["alpha-served"]
            assert not [r for r in state_of(b[0].app)["recent_requests"]
                        if r["path"] == "/tokenize"]


async def test_models_lists_every_model_alias_and_adapter(start_pdlb, oai):
    async with pair("alpha-served", 1, lora_modules="sql=/lora/sql") as a, pair("beta", 2) as b:
        url, _ = await start_pdlb(parse_config(two_models(a, b), "<test>"))
        client = oai(url)
        cards = {m.id: m for m in (await client.models.list()).data}
        assert set(cards) == {"alpha-served", "sql", "beta", "alpha", "a"}
        assert cards["sql"].model_extra["parent"] == "alpha-served"
        assert cards["sql"].model_extra["root"] == "/lora/sql"
        assert cards["alpha"].model_extra["root"] == cards["alpha-served"].model_extra["root"]
        assert cards["a"].model_extra["parent"] is None
        assert {m.owned_by for m in cards.values()} == {"vllm"}


async def test_lora_requests_go_only_where_the_adapter_is(start_pdlb, oai):
    """Two decodes, one with the adapter: every request for it lands there; once the other
    loads it at run time (vLLM's /v1/load_lora_adapter), the next health round sees it and
    both serve it. An adapter nobody lists is a 404."""
    async with EmulatorServer(EmulatorConfig(role="prefill", seed=3, lora_modules="sql")) as p, \
            EmulatorServer(EmulatorConfig(role="decode", seed=3, lora_modules="sql")) as d1, \
            EmulatorServer(EmulatorConfig(role="decode", seed=3)) as d2:
        config = parse_config({"server": {"port": 0}, "health": HEALTH, "pools": {
            "prefill": {"backends": [p.url]},
            "decode": {"backends": [d1.url, d2.url], "policy": "round_robin"}}}, "<test>")
        url, app = await start_pdlb(config)
        client = oai(url)
        for _ in range(6):
            answer = await client.completions.create(model="sql", prompt="select", max_tokens=2)
            assert answer.model == "sql"
        assert len(completions_seen(d1)) == 6 and not completions_seen(d2)
        # the base model still goes to both
        for _ in range(4):
            await client.completions.create(model="emulated-model", prompt="x", max_tokens=1)
        assert len(completions_seen(d2)) == 2
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="other-adapter", prompt="x", max_tokens=1)

        async with aiohttp.ClientSession() as http, http.post(
                d2.url + "/v1/load_lora_adapter",
                json={"lora_name": "sql", "lora_path": "/lora/sql"}) as r:
            assert r.status == 200
        deadline = asyncio.get_running_loop().time() + 5
        while not all("sql" in b.adapters for b in app[ROUTER].groups[0].pools["decode"].backends):
            assert asyncio.get_running_loop().time() < deadline, "the adapter was not seen"
            await asyncio.sleep(0.05)
        before = len(completions_seen(d2))
        for _ in range(4):
            await client.completions.create(model="sql", prompt="select", max_tokens=1)
        assert len(completions_seen(d2)) - before == 2


async def test_lora_with_no_usable_backend_says_which_adapter(start_pdlb, oai):
    async with EmulatorServer(EmulatorConfig(role="prefill", seed=3, lora_modules="sql")) as p, \
            EmulatorServer(EmulatorConfig(role="decode", seed=3)) as d:
        config = parse_config({"server": {"port": 0}, "health": HEALTH, "pools": {
            "prefill": {"backends": [p.url]}, "decode": {"backends": [d.url]}}}, "<test>")
        url, _ = await start_pdlb(config)
        async with aiohttp.ClientSession() as http, http.post(
                url + "/v1/completions",
                json={"model": "sql", "prompt": "x", "max_tokens": 1}) as r:
            body = await r.json()
            assert r.status == 503, body
            assert "sql" in body["error"]["message"]
        assert not completions_seen(d)


@pytest.mark.parametrize(("data", "words"), [
    ({"models": {"m": {"pools": {"prefill": {"backends": ["http://a:1"]}}}}},
     'models.m.pools.decode: missing table [models."m".pools.decode]'),
    ({"models": {"m": {"pools": {"prefill": {"backends": ["http://a:1"]},
                                 "decode": {"backends": ["http://b:1"]}}},
                 "n": {"pools": {"prefill": {"backends": ["http://a:1"]},
                                 "decode": {"backends": ["http://c:1"]}}}}},
     "http://a:1 is a backend of [models.\"m\"] and of [models.\"n\"]"),
    ({"models": {"m": {"aliases": ["x"], "pools": {"prefill": {"backends": ["http://a:1"]},
                                                   "decode": {"backends": ["http://b:1"]}}}},
      "aliases": {"y": "x"}},
     "alias 'y' points to another alias"),
    ({"models": {"m": {"pools": {"prefill": {"backends": ["http://a:1"]},
                                 "decode": {"backends": ["http://b:1"]}}}},
      "aliases": {"m": "z"}},
     "'m' is both an alias and a [models] name"),
    ({"models": {"a/b": {"pools": {}}}}, "a model name must be non-empty, without '/'"),
    ({"server": {}}, "pools.prefill: missing table [pools.prefill]"),
])
def test_model_config_errors_name_the_problem(data, words):
    with pytest.raises(ConfigError) as info:
        parse_config(data, "t.toml")
    assert words in str(info.value)


async def test_several_groups_need_a_cluster_to_run_as_workers(monkeypatch, tmp_path):
    """--workers N shares budgets through one file laid out for one model group: several
    groups need [cluster] (one Redis, each group's stages under its pools' names)."""
    from lb.serve.app import create_app
    from lb.serve.workers import Siblings
    config = parse_config({"pools": {"prefill": {"backends": ["http://a:1"]},
                                     "decode": {"backends": ["http://b:1"]}},
                           "models": {"m": {"pools": {"prefill": {"backends": ["http://c:1"]},
                                                      "decode": {"backends": ["http://d:1"]}}}}},
                          "t.toml")
    monkeypatch.setattr(Siblings, "from_env", staticmethod(lambda: object()))
    with pytest.raises(ConfigError, match="cannot yet share budgets across workers"):
        create_app(config)


def test_model_config_round_trip():
    config = parse_config({
        "server": {"default_model": "m"},
        "aliases": {"gpt-4o-mini": "m"},
        "models": {"m": {"served_name": "org/m", "aliases": ["small"],
                         "kv_transfer": {"connector": "nixl"},
                         "tokenizer": {"kind": "estimate"},
                         "pools": {"prefill": {"backends": ["http://a:1"]},
                                   "decode": {"backends": ["http://b:1"],
                                              "max_inflight_tokens": 1000}}}}}, "t.toml")
    assert list(config.pools) == ["m/prefill", "m/decode"]
    assert config.pools["m/prefill"].policy == "round_robin"
    assert config.pools["m/decode"].policy == "least_tokens"
    assert config.pools["m/decode"].max_inflight_tokens == 1000
    assert config.aliases == {"gpt-4o-mini": "m", "small": "m"}
    model = config.models["m"]
    assert model.served_name == "org/m" and model.tokenizer is not None
    assert model.tokenizer.kind == "estimate" and config.default_model == "m"
    assert not config.has_default_pools
    assert orjson.dumps(sorted(config.pools))  # plain names, usable as labels


def test_the_example_two_model_config_loads():
    from pathlib import Path

    from lb.config import load_config
    config = load_config(Path(__file__).resolve().parents[1] / "examples" / "two-models.toml")
    assert sorted(config.models) == ["llama-8b", "qwen-32b"]
    assert config.aliases == {"gpt-4o-mini": "qwen-32b", "small": "llama-8b"}
