"""The pass-through routes (lb/serve/passthrough.py) through a real pdlb: vLLM's other POST
routes go to one backend of the right pool, untouched, with the completions' guard around
them; GET /version is pdlb's and its backends'; unknown routes stay 404.

The emulator serves /tokenize, /detokenize and /version; the pooling routes (embeddings,
score, rerank...) come from the small fake below, which records who received what.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from emulator import EmulatorConfig, EmulatorServer
from emulator.app import state_of
from emulator.protocol import VLLM_VERSION
from lb.metrics import pdlb_version
from lb.serve.routes import ROUTES
from tests.conftest import make_config
from tests.fake_vllm import run_app

MODEL = "emulated-model"
POOLING_PATHS = ("/v1/embeddings", "/v2/embed", "/pooling", "/classify", "/score", "/v1/score",
                 "/rerank", "/v1/rerank", "/v2/rerank")


# -- a pooling-model server (vLLM answers these only for pooling models) -----------------

def pooling_fake(name: str, seen: list[dict[str, Any]]) -> web.Application:
    """Answers every pooling route with what it received; /v1/embeddings as vLLM shapes it
    (floats, or base64 of little-endian float32 as the openai client asks by default)."""

    async def pooling(request: web.Request) -> web.Response:
        raw = await request.read()
        seen.append({"server": name, "path": request.path, "raw": raw,
                     "headers": {k.lower(): v for k, v in request.headers.items()}})
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return web.json_response({"error": {"message": "JSON decode error",
                                                "type": "BadRequestError", "param": None,
                                                "code": 400}}, status=400)
        if isinstance(body, dict) and "sleep_s" in body:
            await asyncio.sleep(body["sleep_s"])
        if request.path != "/v1/embeddings":
            return web.json_response({"object": "list", "server": name, "path": request.path,
                                      "echo": body})
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = []
        for i, text in enumerate(inputs):
            vector = [float(len(str(text))), float(i), 0.5]
            embedding: Any = vector
            if body.get("encoding_format") == "base64":
                embedding = base64.b64encode(array.array("f", vector).tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        return web.json_response({"object": "list", "model": body.get("model"), "data": data,
                                  "usage": {"prompt_tokens": len(inputs),
                                            "total_tokens": len(inputs)}})

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "embedder",
                                                              "object": "model"}]})

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": f"{name}-version"})

    app = web.Application()
    for path in POOLING_PATHS:
        app.router.add_post(path, pooling)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/version", version)
    return app


@contextlib.asynccontextmanager
async def pooling_pair() -> AsyncIterator[tuple[str, str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []
    async with run_app(pooling_fake("prefill", seen)) as p, \
            run_app(pooling_fake("decode", seen)) as d:
        yield p, d, seen


@pytest.fixture
async def emulated(start_pdlb) -> AsyncIterator[tuple[str, EmulatorServer, EmulatorServer]]:
    async with EmulatorServer(EmulatorConfig(role="prefill", seed=7)) as p, \
            EmulatorServer(EmulatorConfig(role="decode", seed=7)) as d:
        url, _ = await start_pdlb(make_config([p.url], [d.url]))
        yield url, p, d


async def post(url: str, body: Any, headers: dict[str, str] | None = None
               ) -> tuple[int, dict[str, str], Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    sent = {"Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as http, http.post(url, data=data, headers=sent) as r:
        raw = await r.read()
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = raw
        return r.status, {k.lower(): v for k, v in r.headers.items()}, parsed


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers or {}) as r:
        return r.status, orjson.loads(await r.read())


def tokenize_requests(server: EmulatorServer) -> list[dict[str, Any]]:
    return [r for r in state_of(server.app)["recent_requests"] if r["path"] == "/tokenize"]


# -- the route table ----------------------------------------------------------------------

def test_the_table_has_vllms_pooling_paths_and_pools() -> None:
    pools = {r.path: r.pool for r in ROUTES if r.pool is not None}
    assert pools == {"/tokenize": "prefill", "/detokenize": "prefill",
                     **dict.fromkeys(POOLING_PATHS, "decode"), "/v1/responses": "decode"}
    assert [r.path for r in ROUTES if r.streams] == ["/v1/responses"]
    assert all(r.method == "POST" and r.access == "key" for r in ROUTES if r.pool)


# -- tokenize, detokenize, version (the emulator) -------------------------------------------

async def test_tokenize_detokenize_round_trip_is_the_backends_answer(emulated):
    url, p, d = emulated
    body = {"model": MODEL, "prompt": "The quick brown fox jumps over the lazy dog."}
    status, headers, through = await post(url + "/tokenize", body,
                                          {"X-Request-Id": "tok-1"})
    assert status == 200 and headers["x-request-id"] == "tok-1"
    assert headers["content-type"].startswith("application/json")
    direct_status, _, direct = await post(p.url + "/tokenize", body)
    assert (status, through) == (direct_status, direct)
    assert through["count"] == len(through["tokens"]) > 0
    # only the prefill pool's backend saw it, with pdlb's request id and the body as sent
    (seen, _) = tokenize_requests(p)
    assert seen["headers"]["x-request-id"] == "tok-1" and seen["body"] == body
    assert tokenize_requests(d) == []

    status, _, text = await post(url + "/detokenize", {"model": MODEL,
                                                       "tokens": through["tokens"]})
    direct_status, _, direct_text = await post(p.url + "/detokenize",
                                               {"model": MODEL, "tokens": through["tokens"]})
    assert (status, text) == (direct_status, direct_text) == (200, text)
    assert body["prompt"] in text["prompt"]


async def test_chat_tokenize_and_backend_4xx_pass_through(emulated):
    url, p, _ = emulated
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert (await post(url + "/tokenize", chat))[2] == (await post(p.url + "/tokenize", chat))[2]
    bad = {"model": MODEL}  # no prompt: the backend's own 400 comes back as is
    through = await post(url + "/tokenize", bad)
    direct = await post(p.url + "/tokenize", bad)
    assert through[0] == direct[0] == 400 and through[2] == direct[2]
    # a model nobody serves: pdlb's own 404 model_not_found (lb/serve/models.py), the backend
    # not asked — the same status the backend gives
    asked = len(tokenize_requests(p))
    through = await post(url + "/tokenize", {"model": "other-model", "prompt": "x"})
    direct = await post(p.url + "/tokenize", {"model": "other-model", "prompt": "x"})
    assert through[0] == direct[0] == 404 and through[2]["error"]["code"] == "model_not_found"
    assert len(tokenize_requests(p)) == asked + 1  # only the direct one
    # malformed JSON: pdlb does not parse the body; the backend's 400 comes back as is
    through = await post(url + "/tokenize", b"{not json")
    direct = await post(p.url + "/tokenize", b"{not json")
    assert through[0] == direct[0] == 400 and through[2] == direct[2]


async def test_version_is_pdlbs_and_each_backends(emulated):
    url, p, d = emulated
    status, answer = await get(url + "/version")
    assert status == 200
    assert answer == {"version": pdlb_version(),
                      "backends": {p.url: {"version": VLLM_VERSION},
                                   d.url: {"version": VLLM_VERSION}}}


async def test_version_names_a_backend_that_does_not_answer(start_pdlb):
    async with EmulatorServer(EmulatorConfig(role="prefill")) as p:
        dead = "http://127.0.0.1:9"
        url, _ = await start_pdlb(make_config([p.url], [dead]))
        status, answer = await get(url + "/version")
    assert status == 200 and answer["version"] == pdlb_version()
    assert answer["backends"][p.url] == {"version": VLLM_VERSION}
    assert set(answer["backends"][dead]) == {"error"}


# -- the pooling routes (decode pool) -------------------------------------------------------

async def test_pooling_routes_go_to_the_decode_pool_untouched(start_pdlb):
    async with pooling_pair() as (p, d, seen):
        url, _ = await start_pdlb(make_config([p], [d]))
        for path in POOLING_PATHS:
            body = {"model": "embedder", "input": "a", "text_1": "q", "text_2": ["x"]}
            status, headers, answer = await post(url + path, body,
                                                 {"traceparent": "00-abc-def-01",
                                                  "Cookie": "secret=1"})
            assert status == 200, (path, answer)
            if path != "/v1/embeddings":
                assert answer == {"object": "list", "server": "decode", "path": path,
                                  "echo": body}
        assert [s["server"] for s in seen] == ["decode"] * len(POOLING_PATHS)
        assert [s["path"] for s in seen] == list(POOLING_PATHS)
        for s in seen:
            assert s["headers"]["traceparent"] == "00-abc-def-01"
            assert "cookie" not in s["headers"] and s["headers"]["x-request-id"]
        async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
            text = await r.text()
        assert 'pdlb_requests_total{endpoint="embeddings",status="200"} 2.0' in text
        assert 'pdlb_requests_total{endpoint="rerank",status="200"} 3.0' in text


async def test_openai_client_embeddings(start_pdlb):
    async with pooling_pair() as (p, d, seen):
        url, _ = await start_pdlb(make_config([p], [d]))
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as c:
            r = await c.embeddings.create(model="embedder", input=["hello", "hi"])
            floats = await c.embeddings.create(model="embedder", input="abc",
                                               encoding_format="float")
    assert [e.embedding for e in r.data] == [[5.0, 0.0, 0.5], [2.0, 1.0, 0.5]]
    assert floats.data[0].embedding == [3.0, 0.0, 0.5]
    assert r.usage.prompt_tokens == 2
    assert {s["server"] for s in seen} == {"decode"}


async def test_the_least_busy_backend_and_a_retry_past_an_unreachable_one(start_pdlb):
    """Two decode backends, one gone after start-up (the health checker has not noticed):
    every request is answered, by the live one, whichever pdlb tried first."""
    seen: list[dict[str, Any]] = []
    async with run_app(pooling_fake("prefill", seen)) as p, \
            run_app(pooling_fake("decode-a", seen)) as a:
        runner = web.AppRunner(pooling_fake("decode-b", seen))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        b = f"http://{host}:{port}"
        config = make_config([p], [a, b], health={"interval_s": 60, "timeout_s": 0.5,
                                                  "failures_to_eject": 100})
        url, _ = await start_pdlb(config)
        for _ in range(2):
            assert (await post(url + "/score", {"x": 1}))[0] == 200
        assert sorted(s["server"] for s in seen) == ["decode-a", "decode-b"]  # in turn
        await runner.cleanup()
        seen.clear()
        for _ in range(4):
            status, _, answer = await post(url + "/score", {"x": 1})
            assert status == 200 and answer["server"] == "decode-a"


# -- the guard's refusals and the backends' failures ---------------------------------------

async def test_api_key_size_limit_and_content_type(start_pdlb):
    async with pooling_pair() as (p, d, seen):
        config = make_config([p], [d], auth={"api_keys": ["sk-right"]},
                             server={"port": 0, "max_body_bytes": 1024})
        url, _ = await start_pdlb(config)
        status, _, answer = await post(url + "/v1/embeddings", {"input": "a"})
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        status, _, answer = await post(url + "/rerank", {"input": "a"},
                                       {"Authorization": "Bearer sk-wrong"})
        assert status == 401 and answer["error"]["type"] == "authentication_error"
        key = {"Authorization": "Bearer sk-right"}
        status, _, answer = await post(url + "/v1/embeddings", {"input": "a" * 2000}, key)
        assert status == 413 and answer["error"]["code"] == "body_too_large"
        status, _, answer = await post(url + "/score", b"x=1",
                                       {**key, "Content-Type": "text/plain"})
        assert status == 415 and answer["error"]["code"] == "unsupported_media_type"
        assert seen == []
        status, _, answer = await post(url + "/v1/embeddings", {"input": "a"}, key)
        assert status == 200 and answer["data"][0]["embedding"] == [1.0, 0.0, 0.5]
        assert "authorization" not in seen[0]["headers"]  # the client's key stays here
        status, _, answer = await post(url + "/v1/audio/speech", {"input": "a"}, key)
        assert status == 404 and answer["error"]["code"] == "unknown_route"
        async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
            text = await r.text()
        assert 'pdlb_requests_total{endpoint="embeddings",status="401"} 1.0' in text
        assert 'pdlb_requests_total{endpoint="embeddings",status="413"} 1.0' in text
        assert 'pdlb_requests_total{endpoint="score",status="415"} 1.0' in text


async def test_no_usable_backend_is_503_and_an_unreachable_one_502(start_pdlb):
    async with pooling_pair() as (p, _, _seen):
        url, _ = await start_pdlb(make_config([p], ["http://127.0.0.1:9"], health={
            "interval_s": 0.2, "timeout_s": 0.5, "failures_to_eject": 1}))
        status, headers, answer = await post(url + "/v1/embeddings", {"input": "a"})
        assert status == 503 and answer["error"]["code"] == "decode_unavailable"
        assert answer["error"]["type"] == "service_unavailable"
        assert headers["content-type"].startswith("application/json")
    # healthy at start-up, gone before the next check: 502, OpenAI-shaped
    seen: list[dict[str, Any]] = []
    async with run_app(pooling_fake("prefill", seen)) as p:
        runner = web.AppRunner(pooling_fake("decode", seen))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        config = make_config([p], [f"http://{host}:{port}"],
                             health={"interval_s": 60, "timeout_s": 0.5})
        url, _ = await start_pdlb(config)
        await runner.cleanup()
        status, _, answer = await post(url + "/pooling", {"input": "a"})
        assert status == 502 and answer["error"]["type"] == "upstream_error"
        assert answer["error"]["message"]


async def test_unknown_routes_stay_404_and_wrong_methods_405(emulated):
    url, _, _ = emulated
    for path in ("/v1/responses/resp_1", "/v1/audio/transcriptions", "/invocations",
                 "/tokenizer"):
        status, _, answer = await post(url + path, {"x": 1})
        assert status == 404 and answer["error"]["code"] == "unknown_route", path
    async with aiohttp.ClientSession() as http, http.get(url + "/tokenize") as r:
        assert r.status == 405 and "POST" in r.headers["Allow"]


async def test_access_line_per_pass_through_request(start_pdlb, caplog):
    async with EmulatorServer(EmulatorConfig(role="prefill")) as p, \
            EmulatorServer(EmulatorConfig(role="decode")) as d:
        url, _ = await start_pdlb(make_config([p.url], [d.url]))
        with caplog.at_level(logging.INFO, logger="pdlb.access"):
            await post(url + "/tokenize", {"model": MODEL, "prompt": "hi"},
                       {"X-Request-Id": "line-1"})
    (line,) = [r.getMessage() for r in caplog.records if r.name == "pdlb.access"]
    assert "request_id=line-1" in line and "endpoint=tokenize" in line
    assert "status=200" in line and p.url in line


async def test_a_client_gone_mid_call_is_499_and_frees_the_backend(start_pdlb):
    async with pooling_pair() as (p, d, seen):
        url, _ = await start_pdlb(make_config([p], [d]))
        async with aiohttp.ClientSession() as http:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await http.post(url + "/rerank", json={"sleep_s": 2})
        for _ in range(100):
            async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
                text = await r.text()
            if 'pdlb_requests_total{endpoint="rerank",status="499"} 1.0' in text:
                break
            await asyncio.sleep(0.02)
        assert 'pdlb_requests_total{endpoint="rerank",status="499"} 1.0' in text
        assert [s["path"] for s in seen] == ["/rerank"]
        # the fixture checks every in-flight counter is back to zero


# -- /v1/responses: the decode pool alone, streams relayed as they come --------------------

class ResponsesFake:
    """A decode backend's ``/v1/responses`` as vLLM shapes it: JSON, or (``stream: true``)
    SSE events ``response.created`` … ``response.completed``, the last one held back until
    the test calls :meth:`release` — a pdlb that buffered the stream would never deliver the
    first. ``cut: true`` drops the connection after the first event. Records what it got,
    and whether each stream ran to its end."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.finished: list[bool] = []
        self._release = asyncio.Event()

    def release(self) -> None:
        self._release.set()

    def app(self) -> web.Application:
        async def responses(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.seen.append(body)
            if not body.get("stream"):
                return web.json_response({"id": "resp_1", "object": "response",
                                          "status": "completed", "output": [],
                                          "echo": body})
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream; charset=utf-8"})
            await response.prepare(request)
            await response.write(b'event: response.created\ndata: {"type": '
                                 b'"response.created","sequence_number":0}\n\n')
            if body.get("cut"):
                assert request.transport is not None
                request.transport.close()
                return response
            self.finished.append(False)
            await self._release.wait()
            await response.write(b'event: response.completed\ndata: {"type": '
                                 b'"response.completed","sequence_number":1}\n\n')
            self.finished[-1] = True
            await response.write_eof()
            return response

        async def health(request: web.Request) -> web.Response:
            return web.Response()

        app = web.Application()
        app.router.add_post("/v1/responses", responses)
        app.router.add_get("/health", health)
        return app


async def test_responses_go_to_the_decode_pool_and_stream_as_they_come(start_pdlb):
    fake = ResponsesFake()
    seen: list[dict[str, Any]] = []
    async with run_app(pooling_fake("prefill", seen)) as p, run_app(fake.app()) as d:
        url, _ = await start_pdlb(make_config([p], [d]))
        # "embedder": what the fleet lists in /v1/models (pdlb 404s a model nobody serves)
        status, headers, answer = await post(url + "/v1/responses",
                                             {"model": "embedder", "input": "hi"},
                                             {"X-Request-Id": "resp-req-1"})
        assert status == 200 and answer["echo"] == {"model": "embedder", "input": "hi"}
        assert headers["x-request-id"] == "resp-req-1"
        async with aiohttp.ClientSession() as http, \
                http.post(url + "/v1/responses", json={"input": "hi", "stream": True}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async with asyncio.timeout(5):
                first = await r.content.readuntil(b"\n\n")
            assert b"response.created" in first and fake.finished == [False]
            fake.release()
            rest = await r.content.read()
        assert b"response.completed" in rest and fake.finished == [True]
        assert seen == []  # the prefill pool never saw a thing
        async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
            text = await r.text()
        assert 'pdlb_requests_total{endpoint="responses",status="200"} 2.0' in text


async def test_responses_stream_a_client_leaves_or_the_backend_cuts(start_pdlb):
    """A client gone mid-stream closes the backend connection (vLLM aborts on that); a
    backend that drops mid-stream ends the client's stream (the head is already sent)."""
    fake = ResponsesFake()
    async with run_app(pooling_fake("prefill", [])) as p, run_app(fake.app()) as d:
        url, _ = await start_pdlb(make_config([p], [d]))
        async with aiohttp.ClientSession() as http:
            r = await http.post(url + "/v1/responses", json={"input": "hi", "stream": True})
            await r.content.readuntil(b"\n\n")
            r.close()
        for _ in range(100):
            async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as m:
                text = await m.text()
            if 'pdlb_requests_total{endpoint="responses",status="499"} 1.0' in text:
                break
            await asyncio.sleep(0.02)
        assert 'pdlb_requests_total{endpoint="responses",status="499"} 1.0' in text
        fake.release()
        assert fake.finished == [False]  # the fake's write failed: pdlb closed it
        async with aiohttp.ClientSession() as http, \
                http.post(url + "/v1/responses", json={"stream": True, "cut": True}) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.content.read()
        # the fixture checks every in-flight counter is back to zero
