"""A request's prompt as the exact token ids the vLLM engine will see, for KV-aware routing.

``kv_aware`` routing matches a prompt's token ids against the blocks the engines report
holding, so an id that differs from the engine's by one token misses every block after it.
:class:`PromptIds` turns a validated client body into those ids, or ``None`` when it cannot
be exact — the caller then routes approximately. ``ids`` never raises for client input.

* :class:`HFPromptIds` (``[tokenizer] kind = "hf"``): the served model's ``tokenizer.json``
  (the ``tokenizers`` package) and, for chat, its chat template rendered as vLLM 0.32 renders
  it (:class:`lb.chat_template.ChatTemplate`, which says what it reproduces and what not;
  tests/test_prompt_ids.py runs vLLM's own code on the same bodies);
* :class:`EmulatorPromptIds` (``kind = "emulator"``): pdlb's emulator's own tokenizer;
* :func:`tokenize_on_backend` (``token_ids = "backend"``): POST /tokenize on a backend, one
  round trip per request, for models whose template pdlb cannot render
  (:func:`tokenize_request` builds its body).

What vLLM does, and what is reproduced here:

* completions: a string prompt (or a batch of one) is ``encode(prompt, add_special_tokens=
  body.add_special_tokens, default true)`` — the tokenizer's post-processor adds BOS; token ids
  are used as they are. A batch of several prompts, ``prompt_embeds`` or
  ``truncate_prompt_tokens`` give ``None``.
* chat: the text the chat template renders (``None`` where it cannot be exact — see
  lb/chat_template.py) is encoded with ``add_special_tokens`` (default false);
  ``truncate_prompt_tokens`` gives ``None``.

The emulator's ids assume its default ``--add-bos``.

Cost per call, median of 200 warm calls, on the tiny Llama tokenizer (scripts/make_tiny_model.py,
byte-level BPE) and the development machine (2 shared cores: ±20%); "2k" prompts are ~2,000
tokens, the chat one in 8 messages:

=====================  ==============  ===================  ======================
                       completion 2k   chat 2k (template)   one short message
=====================  ==============  ===================  ======================
``HFPromptIds``        1,500 µs        1,630 µs (26 µs)     10 µs / chat 33 µs
``EmulatorPromptIds``  420 µs          445 µs               4 µs / chat 5 µs
=====================  ==============  ===================  ======================

Tokenizing is nearly all of it (~0.75 µs a token for ``tokenizers``, ~0.2 for tiktoken); the
template is compiled once, at construction. ``encode_batch_fast`` is used for one text: it
skips the offsets (a quarter faster than ``encode``) and releases the GIL, which ``encode``
does not — so a long prompt is worth ``asyncio.to_thread``. Instances are safe to share
between threads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import orjson

from lb.chat_template import ChatTemplate, NotExact, flag
from lb.config import TokenizerConfig
from lb.errors import ConfigError


class PromptIds(Protocol):
    """Turns a validated completion or chat body into the engine's exact prompt token ids."""

    def ids(self, endpoint: str, body: Mapping[str, Any]) -> list[int] | None:
        """``endpoint`` is "completions" or "chat"; ``None`` when the ids cannot be exact."""
        ...


# --- the body's fields, shared by every PromptIds ------------------------------------------


def _token_ids(value: Any) -> list[int] | None:
    if isinstance(value, list) and value and all(type(t) is int and t >= 0 for t in value):
        return list(value)
    return None


def _one_prompt(body: Mapping[str, Any]) -> str | list[int]:
    """The one prompt of a completions body: a string or token ids (a batch of one too)."""
    if body.get("prompt_embeds") is not None:
        raise NotExact("prompt_embeds")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    ids = _token_ids(prompt)
    if ids is None:
        raise NotExact("prompt")
    return ids


def _guarded(fn: Callable[[], list[int]]) -> list[int] | None:
    try:
        return fn()
    except Exception:  # client input: any failure means "route approximately"
        return None


# --- HF: tokenizer.json + the chat template -------------------------------------------------


class HFPromptIds:
    """Exact ids for a HuggingFace model: ``path`` is its directory or its tokenizer.json."""

    def __init__(self, path: str, chat_template: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError(
                "tokenizer.kind = \"hf\" needs the 'tokenizers' package (pip install pdlb[hf])"
            ) from None
        if not path:
            raise ConfigError("tokenizer.path: required for kind = \"hf\" (the model directory "
                              "or its tokenizer.json)")
        where = Path(path)
        tokenizer_file = where / "tokenizer.json" if where.is_dir() else where
        try:
            self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ConfigError(
                f"tokenizer.path = {path!r}: cannot load {str(tokenizer_file)!r} ({exc})"
            ) from None
        self._batch_fast = getattr(self._tokenizer, "encode_batch_fast", None)
        self._template = ChatTemplate.from_model(where, chat_template)

    @property
    def special_tokens(self) -> dict[str, str]:
        """The template variables transformers adds: bos_token, eos_token... as strings."""
        return self._template.special_tokens

    @property
    def has_chat_template(self) -> bool:
        return bool(self._template.names)

    def ids(self, endpoint: str, body: Mapping[str, Any]) -> list[int] | None:
        if endpoint == "chat":
            return _guarded(lambda: self._chat(body))
        if endpoint == "completions":
            return _guarded(lambda: self._completion(body))
        return None

    def _completion(self, body: Mapping[str, Any]) -> list[int]:
        if body.get("truncate_prompt_tokens") is not None:
            raise NotExact("truncate_prompt_tokens")
        prompt = _one_prompt(body)
        if isinstance(prompt, list):
            return prompt
        return self._encode(prompt, flag(body, "add_special_tokens", True))

    def _chat(self, body: Mapping[str, Any]) -> list[int]:
        if body.get("truncate_prompt_tokens") is not None:
            raise NotExact("truncate_prompt_tokens")
        text = self._template.render(body)
        return self._encode(text, flag(body, "add_special_tokens", False))

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # encode_batch_fast (tokenizers >= 0.21) skips the offsets — a quarter faster — and,
        # unlike encode, lets other threads run meanwhile.
        if self._batch_fast is not None:
            encodings = self._batch_fast([text], add_special_tokens=add_special_tokens)
            ids: list[int] = encodings[0].ids
        else:
            ids = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids


# --- the emulator ----------------------------------------------------------------------------


class EmulatorPromptIds:
    """Exact ids for pdlb's emulator (emulator/tokens.py), with its default ``--add-bos``."""

    def __init__(self) -> None:
        from emulator.tokens import Tokenizer

        self._tokenizer = Tokenizer()

    def ids(self, endpoint: str, body: Mapping[str, Any]) -> list[int] | None:
        if endpoint == "chat":
            return _guarded(lambda: self._tokenizer.render_chat(
                body.get("messages"), flag(body, "add_generation_prompt", True),
                flag(body, "continue_final_message", False)))
        if endpoint == "completions":
            return _guarded(lambda: self._completion(body))
        return None

    def _completion(self, body: Mapping[str, Any]) -> list[int]:
        prompt = _one_prompt(body)
        if isinstance(prompt, list):
            return prompt
        return self._tokenizer.encode_prompt(prompt, flag(body, "add_special_tokens", True))


def make_prompt_ids(config: TokenizerConfig) -> PromptIds | None:
    """The local source of exact ids that ``[tokenizer]`` names, or None.

    ``token_ids = "off"`` and ``"backend"`` give None: with "backend" the caller asks a
    prefill backend itself (:func:`tokenize_on_backend`). ``"auto"`` gives one only for the
    exact kinds (hf, emulator); ``"local"`` is the same, and the config already refuses it
    with an inexact kind."""
    if config.token_ids in ("off", "backend"):
        return None
    if config.kind == "hf":
        return HFPromptIds(config.path or "", config.chat_template)
    if config.kind == "emulator":
        return EmulatorPromptIds()
    if config.token_ids == "local":
        raise ConfigError(f"tokenizer.token_ids = \"local\" needs an exact tokenizer "
                          f"(kind = \"hf\" or \"emulator\"), not {config.kind!r}")
    return None


# --- the backend's POST /tokenize ----------------------------------------------------------


def tokenize_request(endpoint: str, body: Mapping[str, Any]) -> dict[str, Any] | list[int] | None:
    """vLLM's /tokenize body for a client body (TokenizeCompletionRequest or
    TokenizeChatRequest), the ids themselves when the prompt already is token ids, or None
    when /tokenize cannot say (a batch, prompt_embeds, truncation)."""
    try:
        if body.get("truncate_prompt_tokens") is not None:
            return None
        if endpoint == "completions":
            prompt = _one_prompt(body)
            if isinstance(prompt, list):
                return prompt
            return {"model": body.get("model"), "prompt": prompt,
                    "add_special_tokens": flag(body, "add_special_tokens", True)}
        if endpoint != "chat":
            return None
        kwargs = dict(body.get("chat_template_kwargs") or {})
        # /tokenize has no documents or reasoning_effort: the chat endpoint passes them to the
        # template as chat_template_kwargs, so they travel there.
        effort = body.get("reasoning_effort")
        if body.get("documents") is not None:
            kwargs["documents"] = body["documents"]
        if effort is not None:
            kwargs["reasoning_effort"] = effort
            kwargs.setdefault("enable_thinking", effort != "none")
        out: dict[str, Any] = {
            "model": body.get("model"),
            "messages": body.get("messages"),
            "add_generation_prompt": flag(body, "add_generation_prompt", True),
            "continue_final_message": flag(body, "continue_final_message", False),
            "add_special_tokens": flag(body, "add_special_tokens", False),
        }
        if kwargs:
            out["chat_template_kwargs"] = kwargs
        for key in ("tools", "chat_template", "media_io_kwargs", "mm_processor_kwargs"):
            if body.get(key) is not None:
                out[key] = body[key]
        return out
    except Exception:  # client input: no /tokenize body
        return None


async def tokenize_on_backend(
    post_json: Callable[[str, bytes], Awaitable[Any]],
    base_url: str,
    endpoint: str,
    body: Mapping[str, Any],
) -> list[int] | None:
    """The prompt's ids from ``base_url``'s POST /tokenize; None on any failure.

    ``post_json(url, body_bytes)`` is the caller's HTTP client: it returns the decoded JSON
    answer (or raises). A prompt given as token ids costs no round trip."""
    request = tokenize_request(endpoint, body)
    if request is None or isinstance(request, list):
        return request
    try:
        answer = await post_json(base_url.rstrip("/") + "/tokenize", orjson.dumps(request))
    except Exception:  # the backend's trouble: route approximately
        return None
    return _token_ids(answer.get("tokens")) if isinstance(answer, dict) else None
