"""Protocol conformance: the emulator's payloads against verbatim vLLM 0.32 responses."""

from __future__ import annotations

import json

import openai

from tests.emulator import vllm_samples as samples
from tests.emulator.conftest import post, shape, sse

PROMPT = "The cat runs quickly over the bridge and the dog waits in the garden."
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name three rivers."}]
PREFILL_KV = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
              "remote_block_ids": None, "remote_host": None, "remote_port": None}


def sample_events(text: str) -> list[object]:
    return [json.loads(e[6:]) for e in text.strip().split("\n\n") if e != "data: [DONE]"]


async def test_completion_non_streamed_matches_vllm(emulator, http):
    """A non-streamed completion has exactly vLLM's fields, order and nulls."""
    s = await emulator(role="both")
    status, body = await post(http, s.url + "/v1/completions",
                              {"model": "emulated-model", "prompt": PROMPT, "max_tokens": 8})
    assert status == 200
    assert shape(body) == shape(json.loads(samples.COMPLETION_DECODE))
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["usage"]["completion_tokens"] == 8
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 8
    assert body["system_fingerprint"].startswith("vllm-0.32.0-")


async def test_completion_stream_framing_and_usage_event(emulator, http):
    """SSE framing, one token per event, finish on the last, usage event with choices []."""
    s = await emulator(role="both")
    raw, events = await sse(http, s.url + "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}})
    assert raw.endswith(b"data: [DONE]\n\n")
    expected = sample_events(samples.COMPLETION_DECODE_STREAM)
    assert [shape(e) for e in events] == [shape(e) for e in expected]
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, None, None, "length"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    assert len({e["id"] for e in events}) == 1


async def test_chat_non_streamed_and_streamed_match_vllm(emulator, http):
    """Chat: the message object, the role chunk, content deltas, the final usage event."""
    s = await emulator(role="both")
    status, body = await post(http, s.url + "/v1/chat/completions",
                              {"model": "emulated-model", "messages": MESSAGES, "max_tokens": 6})
    assert status == 200
    assert shape(body) == shape(json.loads(samples.CHAT_DECODE))
    _, events = await sse(http, s.url + "/v1/chat/completions", {
        "messages": MESSAGES, "max_tokens": 6, "stream": True,
        "stream_options": {"include_usage": True}})
    expected = sample_events(samples.CHAT_DECODE_STREAM)
    assert [shape(e) for e in events] == [shape(e) for e in expected]
    content = "".join(e["choices"][0]["delta"]["content"] for e in events[:-1])
    assert content == body["choices"][0]["message"]["content"]


async def test_continuous_usage_stats_on_every_chunk(emulator, http):
    """stream_options.continuous_usage_stats puts running usage in every chunk."""
    s = await emulator(role="both")
    _, events = await sse(http, s.url + "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert [e["usage"]["completion_tokens"] for e in events] == [1, 2, 3, 3]
    _, chat = await sse(http, s.url + "/v1/chat/completions", {
        "messages": MESSAGES, "max_tokens": 2, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert [e["usage"]["completion_tokens"] for e in chat] == [0, 1, 2, 2]
    assert "completion_tokens_details" in chat[1]["usage"]  # vLLM's chat sets it to null


async def test_stream_without_usage_stamps_fingerprint_on_last_chunk(emulator, http):
    """Without include_usage, the terminal chunk carries system_fingerprint (as vLLM does)."""
    s = await emulator(role="prefill")
    raw, events = await sse(http, s.url + "/v1/completions", {
        "prompt": "x", "max_tokens": 1, "stream": True, "kv_transfer_params": PREFILL_KV})
    expected = sample_events(samples.STREAMED_PREFILL)
    assert [shape(e) for e in events] == [shape(e) for e in expected]
    assert b"kv_transfer_params" not in raw


async def test_errors_have_vllm_bodies_and_statuses(emulator, http):
    """400 for stream_options without stream, 404 for an unknown model, 400 max_tokens."""
    s = await emulator(role="both", model="tiny", max_model_len=2048)
    status, body = await post(http, s.url + "/v1/completions",
                              {"model": "tiny", "prompt": PROMPT, "max_tokens": 4,
                               "stream_options": {"include_usage": True}})
    assert (status, body) == (400, json.loads(samples.ERROR_STREAM_OPTIONS))
    status, body = await post(http, s.url + "/v1/completions",
                              {"model": "no-such-model", "prompt": "x", "max_tokens": 4})
    assert (status, body) == (404, json.loads(samples.ERROR_UNKNOWN_MODEL))
    status, body = await post(http, s.url + "/v1/completions",
                              {"model": "tiny", "prompt": "x", "max_tokens": 5000})
    assert (status, body) == (400, json.loads(samples.ERROR_MAX_TOKENS))
    status, body = await post(http, s.url + "/v1/chat/completions",
                              {"messages": MESSAGES, "stream_options": {"include_usage": True}})
    assert status == 400 and body["error"]["param"] == "stream_options"
    status, body = await post(http, s.url + "/v1/completions", {"prompt": "x", "max_tokens": "a"})
    assert status == 400 and body["error"]["type"] == "Bad Request"  # a schema (pydantic) error
    status, body = await post(http, s.url + "/v1/completions", {"prompt": list(range(3000))})
    assert status == 400 and body["error"]["param"] == "input_tokens"
    async with http.post(s.url + "/v1/completions", data=b"{not json",
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400 and set((await resp.json())["error"]) == {
            "message", "type", "param", "code"}
    async with http.post(s.url + "/v1/completions", data=b'{"prompt": "x"}',
                         headers={"Content-Type": "text/plain"}) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == {
            "message": "1 validation error:\n  Unsupported Media Type: Only 'application/json' "
                       "is allowed", "type": "Bad Request", "param": None, "code": 400}
    async with http.get(s.url + "/nowhere") as resp:
        assert resp.status == 404 and await resp.json() == {"detail": "Not Found"}


async def test_models_health_tokenize_version(emulator, http):
    """The side endpoints answer in vLLM's shapes."""
    s = await emulator(role="both", model="tiny", max_model_len=2048)
    async with http.get(s.url + "/v1/models") as resp:
        assert shape(await resp.json()) == shape(json.loads(samples.MODELS))
    async with http.get(s.url + "/health") as resp:
        assert resp.status == 200 and await resp.read() == b""
    status, body = await post(http, s.url + "/tokenize", {"model": "tiny", "prompt": PROMPT})
    assert status == 200 and shape(body) == shape(json.loads(samples.TOKENIZE))
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 2048
    status, chat = await post(http, s.url + "/tokenize", {"model": "tiny", "messages": MESSAGES})
    status2, completion = await post(http, s.url + "/v1/chat/completions",
                                     {"messages": MESSAGES, "max_tokens": 1})
    assert chat["count"] == completion["usage"]["prompt_tokens"]
    status, ids = await post(http, s.url + "/tokenize", {"prompt": [5, 6, 7]})
    assert ids["tokens"] == [5, 6, 7]
    async with http.get(s.url + "/version") as resp:
        assert await resp.json() == {"version": "0.32.0"}


async def test_token_id_prompt_and_defaults(emulator, http):
    """A prompt of token ids is used as is; completions default to 16 tokens like vLLM."""
    s = await emulator(role="both", max_model_len=64)
    status, body = await post(http, s.url + "/v1/completions", {"prompt": [1, 2, 3, 4]})
    assert status == 200
    assert body["usage"]["prompt_tokens"] == 4 and body["usage"]["completion_tokens"] == 16
    status, body = await post(http, s.url + "/v1/chat/completions", {"messages": MESSAGES})
    # chat without max_tokens: up to max_model_len - prompt
    assert body["usage"]["completion_tokens"] == 64 - body["usage"]["prompt_tokens"]
    assert body["choices"][0]["finish_reason"] == "length"


async def test_stop_strings_and_deterministic_text(emulator, http):
    """Same seed and prompt → same text; a stop string ends the output with stop_reason."""
    a = await emulator(role="both")
    b = await emulator(role="both")
    req = {"prompt": PROMPT, "max_tokens": 12}
    _, one = await post(http, a.url + "/v1/completions", req)
    _, two = await post(http, b.url + "/v1/completions", req)
    text = one["choices"][0]["text"]
    assert text == two["choices"][0]["text"] and len(text.split()) == 12
    word = text.split()[3]
    _, stopped = await post(http, a.url + "/v1/completions", {**req, "stop": [" " + word]})
    choice = stopped["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == " " + word
    assert text.startswith(choice["text"]) and word not in choice["text"].split()[3:]
    c = await emulator(role="both", seed=7)
    _, other = await post(http, c.url + "/v1/completions", req)
    assert other["choices"][0]["text"] != text


async def test_official_openai_client(emulator):
    """The official openai client works against the emulator, streamed and not."""
    s = await emulator(role="both")
    async with openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0) as c:
        r = await c.completions.create(model="emulated-model", prompt=PROMPT, max_tokens=5)
        assert r.usage is not None and r.usage.completion_tokens == 5
        assert r.usage.prompt_tokens_details is not None
        stream = await c.chat.completions.create(
            model="emulated-model", messages=MESSAGES, max_tokens=4, stream=True,
            stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage
        assert usage is not None and usage.completion_tokens == 4 and len(text.split()) == 4
        models = await c.models.list()
        assert [m.id for m in models.data] == ["emulated-model"]
        try:
            await c.completions.create(model="emulated-model", prompt="x", max_tokens=0)
        except openai.BadRequestError as exc:
            assert "max_tokens" in str(exc)
        else:
            raise AssertionError("max_tokens=0 must be refused")


async def test_api_key_and_request_id_header(emulator, http):
    """--api-key guards /v1 like vLLM; --enable-request-id-headers echoes X-Request-Id."""
    s = await emulator(role="both", api_key="sekret", enable_request_id_headers=True)
    status, body = await post(http, s.url + "/v1/completions", {"prompt": "x"})
    assert (status, body) == (401, {"error": "Unauthorized"})
    async with http.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                         headers={"Authorization": "Bearer sekret", "X-Request-Id": "abc"}) as r:
        assert r.status == 200 and r.headers["X-Request-Id"] == "abc"
        assert (await r.json())["id"] == "cmpl-abc"


def test_fast_stream_events_equal_the_generic_ones():
    """The pre-serialised middle-token event is byte-for-byte the generic one."""
    import orjson

    from emulator.config import EmulatorConfig
    from emulator.protocol import StreamChunks, parse_request
    from emulator.tokens import Tokenizer

    tok, config = Tokenizer(), EmulatorConfig()
    for kind, body in (("completion", {"prompt": "hi", "stream": True}),
                       ("chat", {"messages": MESSAGES, "stream": True})):
        req = parse_request(kind, body, None, tok, config)
        chunks = StreamChunks(req, 1234)
        assert chunks.fast
        generic = chunks.token_chunk(' a "quoted" word', [1], 2, None, None, False)
        assert chunks.plain(' a "quoted" word') == b"data: " + orjson.dumps(generic) + b"\n\n"
