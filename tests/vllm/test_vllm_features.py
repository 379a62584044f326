"""Request features through pdlb's prefill/decode hop, against REAL vLLM (CPU, tiny model).

For each feature the same request goes twice: through pdlb (prefill leg, NIXL pull, decode
leg) and straight to the same decode backend without pdlb (it computes the prompt itself).
Greedy sampling (or a fixed ``seed``) makes both answers the same — the choices, their
logprobs, echoed prompts, structured output, tool calls, finish reasons and token counts —
or pdlb must refuse the request with a clear OpenAI-shaped 400 saying why. docs/api.md's
table of request fields points at the test of each row here.

One pair (its chat template renders ``tools``: tests/vllm/tool_chat_template.jinja; vLLM's
``pythonic`` tool parser for ``tool_choice: "auto"``) and one pdlb serve the whole module.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from tokenizers import Tokenizer

from lb.tools.launch_vllm import VllmPool
from tests.vllm.test_vllm_e2e import metric, pdlb_inflight, wait_for

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

VLLM_ARGS = ("--chat-template", str(Path(__file__).with_name("tool_chat_template.jinja")),
             "--enable-auto-tool-choice", "--tool-call-parser", "pythonic")
"""Added to both servers' ``vllm serve`` (conftest's vllm_pair reads it)."""

MODEL = "tiny"
KV_SOURCE = "vllm:prompt_tokens_by_source_total"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
PROMPT = "the old dog finds a letter near the river and"
MESSAGES = [{"role": "user", "content": "a small bird sings in the garden at night"}]
GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 8}
VOLATILE = {"id", "created", "system_fingerprint", "kv_transfer_params", "service_tier"}
"""Fields of an answer that differ between any two requests (or say how it was served)."""
LOGPROB_TOLERANCE = 1e-3
"""Logprobs of the same token computed by different batch shapes (the decode computes the
last prompt position alone after a pull; directly, with the whole prompt) differ by float
rounding only."""
_slow: list[str] = []
"""pdlb requests that took over 5 s (tiny model: normally well under 1 s), reported at the
end of the session with vLLM's and pdlb's logs for a look."""
_largest_float_difference = [0.0]
"""The largest float difference assert_same accepted, reported at the end of the session."""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}
SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                           "count": {"type": "integer"}},
          "required": ["colour", "count"], "additionalProperties": False}


@pytest.fixture(scope="module", autouse=True)
def _module_clock(vllm_timings: list[str]) -> Iterator[None]:
    started = time.monotonic()
    yield
    vllm_timings.append(f"test_vllm_features.py: {time.monotonic() - started:.1f} s in all "
                        "(pair start-up included); largest float difference pdlb vs direct: "
                        f"{_largest_float_difference[0]:.2g}")
    vllm_timings.extend(_slow)


@pytest.fixture(scope="module")
def decode_url(vllm_pair: VllmPool) -> str:
    return vllm_pair.decode_urls[0]


@pytest.fixture(scope="module")
def eot_id(tiny_model: Path) -> int:
    """The tiny model's end-of-turn token (one of its EOS ids)."""
    token = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).token_to_id("<|eot_id|>")
    assert isinstance(token, int)
    return token


@pytest.fixture
def client(pdlb_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{pdlb_url}/v1", api_key="unused", max_retries=0,
                       timeout=60) as c:
        yield c


@pytest.fixture(autouse=True)
def _idle_after(pdlb_url: str, vllm_pair: VllmPool) -> Iterator[None]:
    """After every test: pdlb's in-flight gauges and both servers' running counts are 0."""
    yield
    try:
        wait_for(lambda: not any(pdlb_inflight(pdlb_url).values()), 10,
                 "pdlb in-flight gauges at zero")
    except AssertionError:
        pytest.fail(f"pdlb in-flight gauges not zero: {pdlb_inflight(pdlb_url)}")
    for url in vllm_pair.prefill_urls + vllm_pair.decode_urls:
        wait_for(lambda u=url: metric(u, "vllm:num_requests_running") == 0, 10,
                 f"vllm:num_requests_running == 0 on {url}")


def post(base: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POST ``body`` as JSON; (status, decoded JSON answer) whatever the status."""
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def post_stream(base: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST a streamed request; its SSE events' JSON, in order, up to ``[DONE]`` (required)."""
    req = urllib.request.Request(base + path, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    events: list[dict[str, Any]] = []
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return events
            events.append(json.loads(line[len("data: "):]))
    raise AssertionError(f"stream ended without [DONE] after {len(events)} events")


def normalized(answer: Any) -> Any:
    """An answer without its volatile fields; usage reduced to the token counts (pdlb reports
    the prefill's cached tokens, a direct call the decode's own)."""
    if isinstance(answer, dict):
        out = {k: normalized(v) for k, v in answer.items() if k not in VOLATILE}
        if isinstance(answer.get("usage"), dict):
            usage = answer["usage"]
            out["usage"] = {k: usage.get(k) for k in
                            ("prompt_tokens", "completion_tokens", "total_tokens")}
        return out
    if isinstance(answer, list):
        return [normalized(v) for v in answer]
    return answer


def assert_same(got: Any, want: Any, where: str = "answer") -> None:
    """Equal, floats within LOGPROB_TOLERANCE; the message names the first difference."""
    if isinstance(want, float) and isinstance(got, int | float) and not isinstance(got, bool):
        assert abs(got - want) <= LOGPROB_TOLERANCE, f"{where}: {got} != {want}"
        _largest_float_difference[0] = max(_largest_float_difference[0], abs(got - want))
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), \
            f"{where}: keys {sorted(got) if isinstance(got, dict) else got} != {sorted(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got} != {want}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def kv_sources(decode_url: str) -> dict[str, float]:
    """The decode's prompt tokens by source, so far."""
    return {src: metric(decode_url, KV_SOURCE, source=src)
            for src in ("external_kv_transfer", "local_compute", "local_cache_hit")}


def through_pd(pdlb_url: str, decode_url: str, path: str, body: dict[str, Any],
               kv: str | None = "pulled") -> dict[str, Any]:
    """The request through pdlb and straight to the decode: both 200, the same answer.

    ``kv`` says how the decode got the prompt's KV for pdlb's request: ``"pulled"`` (none of
    it computed on the decode: pulled over NIXL from the prefill, or whole 128-token blocks
    the decode already cached) or ``"computed"`` (the decode computed it all: no prefill
    leg); None: not checked. vLLM counts the prompt once per choice (``n``). Returns pdlb's
    answer."""
    before = kv_sources(decode_url)
    started = time.monotonic()
    status, via = post(pdlb_url, path, body)
    if (took := time.monotonic() - started) > 5:
        _slow.append(f"slow through pdlb ({took:.1f} s): {path} {json.dumps(body)[:200]}")
    assert status == 200, via
    if kv is None:
        status, direct = post(decode_url, path, body)
        assert status == 200, direct
        assert_same(normalized(via), normalized(direct))
        return via
    prompt_tokens = via["usage"]["prompt_tokens"] * body.get("n", 1)
    # vLLM counts a request's prompt tokens when it logs its stats: give it a moment.
    deadline = time.monotonic() + 5
    while True:
        after = kv_sources(decode_url)
        delta = {k: after[k] - before[k] for k in after}
        if sum(delta.values()) >= prompt_tokens or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if kv == "pulled":
        assert delta["local_compute"] == 0 and delta["external_kv_transfer"] > 0, delta
        assert delta["external_kv_transfer"] + delta["local_cache_hit"] == prompt_tokens, delta
    else:
        assert delta == {"external_kv_transfer": 0, "local_compute": prompt_tokens,
                         "local_cache_hit": 0}, delta
    status, direct = post(decode_url, path, body)
    assert status == 200, direct
    assert_same(normalized(via), normalized(direct))
    return via


def refused_alike(pdlb_url: str, decode_url: str, path: str, body: dict[str, Any]
                  ) -> dict[str, Any]:
    """vLLM refuses the request itself: the same 400 and message through pdlb as directly."""
    status, via = post(pdlb_url, path, body)
    direct_status, direct = post(decode_url, path, body)
    assert (status, direct_status) == (400, 400), (via, direct)
    assert via["error"]["message"] == direct["error"]["message"]
    return via


def streamed_text(events: list[dict[str, Any]]) -> dict[int, tuple[str, str | None]]:
    """Per choice index: the concatenated text (or delta content) and the finish reason."""
    out: dict[int, tuple[str, str | None]] = {}
    for event in events:
        for choice in event.get("choices") or []:
            text, finish = out.get(choice["index"], ("", None))
            piece = choice.get("text")
            if piece is None:
                piece = (choice.get("delta") or {}).get("content") or ""
            out[choice["index"]] = (text + piece, choice.get("finish_reason") or finish)
    return out


# -- sampling: n, best_of, seed -----------------------------------------------------------

@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_n_sampled_with_seed(pdlb_url, decode_url, path):
    """n = 3, sampled (temperature 1) with a seed: the decode draws the same three different
    samples from the one pulled prompt as from its own."""
    body = {**GREEDY, "temperature": 1.0, "seed": 1234, "n": 3, "max_tokens": 12,
            **_prompt(path)}
    answer = through_pd(pdlb_url, decode_url, path, body)
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    texts = {c.get("text") or c["message"]["content"] for c in answer["choices"]}
    assert len(texts) > 1, "samples should differ"


def test_n_greedy_refused_by_vllm(pdlb_url, decode_url):
    """vLLM refuses n > 1 with greedy sampling; its 400 comes back through pdlb."""
    answer = refused_alike(pdlb_url, decode_url, CHAT, {**GREEDY, "n": 2, "messages": MESSAGES})
    assert "n must be 1" in answer["error"]["message"]


def test_best_of(pdlb_url, decode_url):
    """vLLM 0.32 has no ``best_of`` (V1 dropped it): ignored both ways, same answer."""
    through_pd(pdlb_url, decode_url, COMPLETIONS, {**GREEDY, "best_of": 3, "prompt": PROMPT})


def test_n_streamed(pdlb_url, decode_url):
    """n = 2, streamed: each choice's text and finish reason as directly."""
    body = {**GREEDY, "temperature": 1.0, "seed": 7, "n": 2, "messages": MESSAGES,
            "stream_options": {"include_usage": True}}
    via, direct = post_stream(pdlb_url, CHAT, body), post_stream(decode_url, CHAT, body)
    assert streamed_text(via) == streamed_text(direct)
    assert sorted(streamed_text(via)) == [0, 1]
    assert normalized(via[-1])["usage"] == normalized(direct[-1])["usage"]


# -- echo and logprobs --------------------------------------------------------------------

@pytest.mark.parametrize("extra,kv", [
    ({"echo": True}, "pulled"),
    ({"logprobs": 3}, "pulled"),
    ({"echo": True, "logprobs": 2}, "computed"),
    ({"prompt_logprobs": 2}, "computed"),
    ({"prompt_logprobs": 0, "logprobs": 1}, "computed"),
], ids=["echo", "logprobs", "echo-logprobs", "prompt_logprobs", "prompt-and-output-logprobs"])
def test_completion_logprobs_and_echo(pdlb_url, decode_url, extra, kv):
    """Output logprobs and a plain echo go through PD. Prompt logprobs (``echo`` with
    ``logprobs`` asks for them too) read no pulled KV in vLLM: pdlb sends them to the
    decode alone, which computes the prompt — the same answer, without a wasted prefill."""
    answer = through_pd(pdlb_url, decode_url, COMPLETIONS, {**GREEDY, "prompt": PROMPT, **extra},
                        kv=kv)
    if extra.get("echo"):
        assert answer["choices"][0]["text"].startswith(PROMPT)
    if kv == "computed":
        assert answer["choices"][0]["prompt_logprobs"]


@pytest.mark.parametrize("extra,kv", [
    ({"logprobs": True, "top_logprobs": 3}, "pulled"),
    ({"prompt_logprobs": 2}, "computed"),
    ({"echo": True}, "computed"),
    ({"echo": True, "top_logprobs": None}, "computed"),
], ids=["logprobs", "prompt_logprobs", "echo", "echo-null-top_logprobs"])
def test_chat_logprobs_and_echo(pdlb_url, decode_url, extra, kv):
    """As for completions; chat's ``echo`` (vLLM's extension) always asks for prompt
    logprobs (vLLM's ``top_logprobs`` is 0 by default, and a null becomes 0)."""
    through_pd(pdlb_url, decode_url, CHAT, {**GREEDY, "messages": MESSAGES, **extra}, kv=kv)


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_beam_search(pdlb_url, vllm_pair, decode_url, path):
    """``use_beam_search``: vLLM's beam search drops the request's kv_transfer_params, so the
    decode would never pull (and the prefill would hold its blocks for minutes): pdlb sends
    it to the decode alone — the same beams as directly."""
    prefill_url = vllm_pair.prefill_urls[0]
    prefill_before = metric(prefill_url, "vllm:request_success_total")
    body = {**GREEDY, **_prompt(path), "use_beam_search": True, "n": 2}
    # Beam search runs one engine request per step and beam: no per-request KV count.
    answer = through_pd(pdlb_url, decode_url, path, body, kv=None)
    assert len(answer["choices"]) == 2
    assert metric(prefill_url, "vllm:request_success_total") == prefill_before


def test_logprobs_streamed(pdlb_url, decode_url):
    """Streamed chat logprobs: the same tokens and values, chunk by chunk."""
    body = {**GREEDY, "messages": MESSAGES, "logprobs": True, "top_logprobs": 2}
    via, direct = post_stream(pdlb_url, CHAT, body), post_stream(decode_url, CHAT, body)

    def tokens(events: list[dict[str, Any]]) -> list[Any]:
        return [entry for e in events for c in e["choices"]
                for entry in ((c.get("logprobs") or {}).get("content") or [])]

    assert tokens(via) and len(tokens(via)) == 8
    assert_same(tokens(via), tokens(direct), "logprobs")


# -- structured outputs and tools ---------------------------------------------------------

def test_response_format_json_schema(pdlb_url, decode_url):
    body = {**GREEDY, "max_tokens": 40, "messages": MESSAGES,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "thing", "schema": SCHEMA}}}
    answer = through_pd(pdlb_url, decode_url, CHAT, body)
    content = answer["choices"][0]["message"]["content"]
    if answer["choices"][0]["finish_reason"] == "stop":
        assert set(json.loads(content)) == {"colour", "count"}


@pytest.mark.parametrize("path,so", [
    (COMPLETIONS, {"choice": ["red", "green", "blue"]}),
    (CHAT, {"regex": "[a-c]{3}-[0-9]{2}"}),
    (COMPLETIONS, {"json": SCHEMA}),
], ids=["choice", "regex", "json"])
def test_structured_outputs(pdlb_url, decode_url, path, so):
    body = {**GREEDY, "max_tokens": 40, **_prompt(path), "structured_outputs": so}
    answer = through_pd(pdlb_url, decode_url, path, body)
    choice = answer["choices"][0]
    text = choice["text"] if path == COMPLETIONS else choice["message"]["content"]
    if "choice" in so:
        assert text in so["choice"]


def test_guided_fields_ignored_by_vllm(pdlb_url, decode_url):
    """``guided_*`` fields were removed from vLLM (0.32 ignores them, unconstrained): the same
    answer through pdlb as directly — pdlb passes them on like any field."""
    body = {**GREEDY, "prompt": PROMPT, "guided_choice": ["red", "green"]}
    answer = through_pd(pdlb_url, decode_url, COMPLETIONS, body)
    assert answer["choices"][0]["text"] not in ("red", "green")


@pytest.mark.parametrize("tool_choice", [
    {"type": "function", "function": {"name": "get_weather"}},
    "required",
    "auto",
    "none",
], ids=["named", "required", "auto", "none"])
def test_tools(pdlb_url, decode_url, tool_choice):
    body = {**GREEDY, "max_tokens": 40, "messages": MESSAGES, "tools": [WEATHER_TOOL],
            "tool_choice": tool_choice}
    answer = through_pd(pdlb_url, decode_url, CHAT, body)
    message = answer["choices"][0]["message"]
    if isinstance(tool_choice, dict) and answer["choices"][0]["finish_reason"] == "stop":
        assert message["tool_calls"][0]["function"]["name"] == "get_weather"


def test_tools_with_openai_client(client, decode_url):
    """The official client's tool call through pdlb equals the decode's own answer."""
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL], max_tokens=40, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    status, direct = post(decode_url, CHAT, {
        **GREEDY, "max_tokens": 40, "messages": MESSAGES, "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert status == 200
    calls = r.choices[0].message.tool_calls or []
    want = direct["choices"][0]["message"]["tool_calls"]
    assert [(c.function.name, c.function.arguments) for c in calls] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in want]


# -- stopping: stop, stop_token_ids, min_tokens, ignore_eos -------------------------------

def test_stop_string(pdlb_url, decode_url):
    """A stop string taken from the free answer's middle cuts both answers there."""
    free = through_pd(pdlb_url, decode_url, COMPLETIONS, {**GREEDY, "prompt": PROMPT,
                                                          "max_tokens": 16})
    text = free["choices"][0]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    answer = through_pd(pdlb_url, decode_url, COMPLETIONS,
                        {**GREEDY, "prompt": PROMPT, "max_tokens": 16, "stop": [stop]})
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["choices"][0]["text"] == text[:text.index(stop)]


def test_stop_token_ids_and_min_tokens(pdlb_url, decode_url):
    """``stop_token_ids`` ends the decode at that token; ``min_tokens`` holds it back: the
    client's values reach the decode (the prefill gets neither)."""
    free = through_pd(pdlb_url, decode_url, COMPLETIONS,
                      {**GREEDY, "prompt": PROMPT, "max_tokens": 10, "logprobs": 0,
                       "return_tokens_as_token_ids": True})
    tokens = [int(t.split(":")[1]) for t in free["choices"][0]["logprobs"]["tokens"]]
    stop_at = tokens[2]
    first = tokens.index(stop_at)
    stopped = through_pd(pdlb_url, decode_url, COMPLETIONS,
                         {**GREEDY, "prompt": PROMPT, "max_tokens": 10,
                          "stop_token_ids": [stop_at]})
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == first + 1
    held = through_pd(pdlb_url, decode_url, COMPLETIONS,
                      {**GREEDY, "prompt": PROMPT, "max_tokens": 10,
                       "stop_token_ids": [stop_at], "min_tokens": first + 3})
    assert held["usage"]["completion_tokens"] > first + 1


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_eos_and_client_ignore_eos(pdlb_url, decode_url, eot_id, path):
    """EOS forced by ``logit_bias``: without ``ignore_eos`` the decode stops at once (the
    prefill's own ``ignore_eos: true`` did not leak into the decode body); with the client's
    ``ignore_eos: true`` it runs to max_tokens. The prefill's single token is EOS too, and
    its ``ignore_eos`` keeps the KV for the decode."""
    base = {**GREEDY, **_prompt(path), "logit_bias": {str(eot_id): 100}}
    stopped = through_pd(pdlb_url, decode_url, path, base)
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == 1
    ran = through_pd(pdlb_url, decode_url, path, {**base, "ignore_eos": True})
    assert ran["choices"][0]["finish_reason"] == "length"
    assert ran["usage"]["completion_tokens"] == GREEDY["max_tokens"]


# -- what cannot go through -----------------------------------------------------------------

def test_multimodal_part_on_a_text_model(pdlb_url, decode_url):
    """An image part to a text-only model: vLLM's 400, the same through pdlb as directly."""
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": _PNG}}]}]
    body = {**GREEDY, "messages": messages}
    refused_alike(pdlb_url, decode_url, CHAT, body)


def _prompt(path: str) -> dict[str, Any]:
    return {"prompt": PROMPT} if path == COMPLETIONS else {"messages": MESSAGES}


# A 1x1 PNG.
_PNG = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
        "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")


# -- /v1/responses ----------------------------------------------------------------------------

RESPONSES = "/v1/responses"


def output_text(answer: dict[str, Any]) -> str:
    return "".join(part.get("text", "") for item in answer["output"]
                   if item.get("type") == "message" for part in item["content"])


def test_responses_kv_transfer_works_in_vllm_by_hand(vllm_pair, decode_url):
    """What vLLM 0.32 does with kv_transfer_params on /v1/responses (no pdlb): the prefill
    returns them, and a decode given them pulls the prompt's KV — the same two-leg handshake
    as the completion routes. pdlb does not drive it yet (docs/api.md)."""
    prefill_url = vllm_pair.prefill_urls[0]
    body = {"model": MODEL, "input": PROMPT, "temperature": 0, "max_output_tokens": 8}
    status, prefilled = post(prefill_url, RESPONSES, {
        **body, "max_output_tokens": 1, "ignore_eos": True,
        "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}})
    assert status == 200, prefilled
    params = prefilled["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["remote_engine_id"], params
    before = kv_sources(decode_url)
    status, pulled = post(decode_url, RESPONSES, {**body, "kv_transfer_params": params})
    assert status == 200, pulled
    prompt_tokens = pulled["usage"]["input_tokens"]
    wait_for(lambda: kv_sources(decode_url)["external_kv_transfer"]
             - before["external_kv_transfer"] >= prompt_tokens, 5, "the decode's pull counted")
    after = kv_sources(decode_url)
    assert after["local_compute"] == before["local_compute"]
    status, direct = post(decode_url, RESPONSES, body)
    assert status == 200 and output_text(pulled) == output_text(direct)


def test_responses_through_pdlb_go_to_the_decode_alone(pdlb_url, vllm_pair, decode_url):
    """pdlb passes /v1/responses to the decode pool: the same answer as the decode's own,
    streamed or not, and the prefill never sees it."""
    prefill_url = vllm_pair.prefill_urls[0]
    prefill_before = metric(prefill_url, "vllm:request_success_total")
    body = {"model": MODEL, "input": PROMPT, "temperature": 0, "max_output_tokens": 8}
    status, via = post(pdlb_url, RESPONSES, body)
    assert status == 200, via
    status, direct = post(decode_url, RESPONSES, body)
    assert status == 200 and output_text(via) == output_text(direct) != ""
    assert via["usage"]["input_tokens"] == direct["usage"]["input_tokens"]
    req = urllib.request.Request(pdlb_url + RESPONSES,
                                 data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [json.loads(line[len(b"data: "):]) for line in resp
                  if line.startswith(b"data: ")]
    assert events[-1]["type"] == "response.completed"
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == output_text(direct)
    assert metric(prefill_url, "vllm:request_success_total") == prefill_before


def test_responses_with_openai_client(client, decode_url):
    r = client.responses.create(model=MODEL, input=PROMPT, temperature=0, max_output_tokens=8)
    status, direct = post(decode_url, RESPONSES, {"model": MODEL, "input": PROMPT,
                                                  "temperature": 0, "max_output_tokens": 8})
    assert status == 200 and r.output_text == output_text(direct)
