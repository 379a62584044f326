"""Parse and validate a client's completion/chat body once, into an immutable request.

Everything downstream (token counting, routing, connectors, relay) reads this object instead
of poking at the raw dict, so the checks live here and nowhere else. Validation is deliberately
about *shape* (what pdlb needs to route and to keep the two legs consistent); semantic checks
(is the model served? is max_tokens within the context?) are the backend's, and its 4xx answer
is passed through to the client unchanged.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from lb.errors import InvalidRequest
from lb.migration import Transcript

Endpoint = Literal["completions", "chat"]

ENDPOINT_PATHS: Mapping[Endpoint, str] = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
}


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """One client request after validation. ``body`` is the client's JSON, never mutated."""

    endpoint: Endpoint
    body: Mapping[str, Any]
    request_id: str
    stream: bool
    max_tokens: int | None
    model: str | None
    session_key: str | None
    transcript: Transcript | None = None
    """Set when a broken stream may be continued (lb/migration.py): what the client got."""
    decode_alone: bool = False
    """vLLM's decode would not read pulled KV for this request (:func:`reads_no_pulled_kv`):
    it computes the prompt itself, so the request skips the prefill leg."""

    @property
    def path(self) -> str:
        return ENDPOINT_PATHS[self.endpoint]


def _fail(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_value")


def _optional_int(body: Mapping[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"'{name}' must be an integer", name)
    if value < minimum:
        raise _fail(f"'{name}' must be >= {minimum}, got {value}", name)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return
        if all(_is_int(p) for p in prompt):
            return
        if all(
            isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt
        ):
            return
    raise _fail(
        "'prompt' must be a string, a list of strings, a list of token ids,"
        " or a list of token-id lists (non-empty)",
        "prompt",
    )


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _fail("'messages' must be a non-empty array of message objects", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _fail(f"messages[{i}] must be an object with a string 'role'", "messages")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _fail(f"messages[{i}].content must be a string or an array of parts", "messages")


def parse_request(
    raw: bytes, endpoint: Endpoint, headers: Mapping[str, str]
) -> ProxyRequest:
    """Validate ``raw`` (the request body) for ``endpoint``; raise :class:`InvalidRequest`."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _fail("'model' must be a string", "model")

    if endpoint == "completions":
        if "prompt" not in body:
            raise InvalidRequest("'prompt' is required", param="prompt", code="missing_field")
        _check_prompt(body["prompt"])
    else:
        if "messages" not in body:
            raise InvalidRequest("'messages' is required", param="messages", code="missing_field")
        _check_messages(body["messages"])

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _fail("'stream' must be a boolean", "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _fail("'stream_options' must be an object", "stream_options")
    if stream_options is not None and not stream:
        # vLLM answers 400 here too; saying it ourselves saves two hops.
        raise _fail("'stream_options' is only allowed when 'stream' is true", "stream_options")

    max_tokens = _optional_int(body, "max_tokens", 1)
    if endpoint == "chat":
        max_completion_tokens = _optional_int(body, "max_completion_tokens", 1)
        if max_completion_tokens is not None:
            max_tokens = max_completion_tokens
    _optional_int(body, "n", 1)

    user = body.get("user")
    session_key = headers.get("x-session-id") or (user if isinstance(user, str) else None)
    request_id = headers.get("x-request-id") or _new_request_id()
    return ProxyRequest(
        endpoint=endpoint,
        body=body,
        request_id=request_id,
        stream=stream,
        max_tokens=max_tokens,
        model=model,
        session_key=session_key,
        decode_alone=reads_no_pulled_kv(body, endpoint),
    )


def reads_no_pulled_kv(body: Mapping[str, Any], endpoint: Endpoint) -> bool:
    """Whether vLLM (0.32) would compute this request's prompt on the decode whatever KV a
    prefill made for it: prompt logprobs (:func:`wants_prompt_logprobs`), or beam search
    (``use_beam_search``: vLLM's beam search builds its own sampling parameters, without the
    request's ``kv_transfer_params``, so the decode never pulls, and the prefill would hold
    its blocks until NIXL's abort timeout, 480 s by default)."""
    return bool(body.get("use_beam_search")) or wants_prompt_logprobs(body, endpoint)


def wants_prompt_logprobs(body: Mapping[str, Any], endpoint: Endpoint) -> bool:
    """Whether vLLM (0.32) computes logprobs over this request's prompt.

    It does for ``prompt_logprobs`` set, and for ``echo`` with logprobs: completions' ``echo``
    with ``logprobs`` set; chat's ``echo`` (a vLLM extension) always, since its
    ``top_logprobs`` is never None (default 0; a null becomes 0) (``to_sampling_params`` in
    vllm/entrypoints/openai/{completion,chat_completion}/protocol.py). Such a request never
    reads KV it did not compute: vLLM sets ``skip_reading_prefix_cache`` and its scheduler
    then takes no external tokens from the KV connector, so the decode computes the whole
    prompt (and tells the prefill to free its blocks). A prefill leg would be pure waste.
    """
    if body.get("prompt_logprobs") is not None:
        return True
    if not body.get("echo"):
        return False
    return endpoint == "chat" or body.get("logprobs") is not None


_ID_PREFIX = ""


def _fresh_id_prefix() -> None:
    """A new random prefix; also in a forked child, whose ids must not repeat its parent's."""
    global _ID_PREFIX
    _ID_PREFIX = f"pdlb-{uuid.uuid4().hex[:16]}-"


_fresh_id_prefix()
os.register_at_fork(after_in_child=_fresh_id_prefix)
_id_counter = itertools.count(1)


def _new_request_id() -> str:
    """Unique per process (a random prefix) and per request (a counter): no syscall and no
    UUID object per request, as ``uuid4()`` would cost."""
    return f"{_ID_PREFIX}{next(_id_counter)}"


def dumps(obj: Any) -> bytes:
    """JSON-encode a leg's body (orjson: fast, compact, UTF-8)."""
    return orjson.dumps(obj)
