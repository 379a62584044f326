"""Stream migration: what a broken stream already gave the client, and its continuation.

When a decode dies after the first byte of a streamed answer (connection lost, truncated
body, idle timeout), the proxy (lb/proxy.py) may continue the SAME client stream on another
prefill + decode pair instead of ending it with an SSE error event (docs/migration.md):

* :class:`Transcript` is what the client received so far. On the first leg the stream relay
  only keeps the bytes it already wrote (one list append per piece, no parsing); they are
  parsed once, when the stream breaks (:meth:`Transcript.settle`). A continuation's chunks
  are parsed anyway (lb/stream/resume.py rewrites them), so they update it directly.
* :func:`refusal` says up front whether a request can be continued at all (``n > 1``,
  ``echo``, structured output... the table in docs/migration.md); :meth:`Transcript.why_not`
  says it at the break (a tool call or reasoning already streamed).
* :func:`continuation` builds the next request: completions — the prompt followed by what
  was generated (token ids when the stream carried them, so nothing is re-tokenised), chat —
  the messages plus the partial assistant message with ``continue_final_message``;
  ``max_tokens`` reduced by the tokens already generated; every other field unchanged.

:class:`StreamBroken` is the signal from the stream wing to the proxy. Nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from lb.connectors.base import PrefillResult

# vLLM's CompletionRequest.max_tokens default (chat's default is "what the context allows").
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

_EVENT_END = re.compile(rb"\r?\n\r?\n")

# Request fields that make a continuation wrong or impossible, with the reason logged.
_STRUCTURED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
               "structured_outputs")


class StreamBroken(Exception):
    """The decode's stream broke after the client got its first byte; a continuation may
    go on with it. ``error`` is what broke it; ``backend`` (set by lb/legs.py) the decode."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error) or type(error).__name__)
        self.error = error
        self.backend: str | None = None


class Transcript:
    """One streamed request's answer as the client has it, across its decode legs."""

    __slots__ = ("attempts", "avoid", "backend_error", "broke_at", "chat", "chunks",
                 "created", "finish", "id", "index", "model", "origin", "pieces", "prefill",
                 "prompt_token_ids", "prompt_tokens", "reasoning", "refused", "role_sent",
                 "started", "texts", "token_ids", "tools", "usage_sent")

    def __init__(self, origin: Mapping[str, Any], chat: bool, refused: str | None = None
                 ) -> None:
        self.origin = origin
        """The client's request body: every continuation is built from it."""
        self.chat = chat
        self.refused = refused
        """Why this request is never continued (None: it may be)."""
        self.pieces: list[bytes] = []
        """The bytes the client was sent and that are not parsed yet (the first leg's)."""
        self.started = False
        """The client's stream head is out: later legs continue it."""
        self.attempts = 0
        self.avoid: list[str] = []
        """Decode URLs whose streams broke for this request: continuations avoid them."""
        self.broke_at = 0.0
        self.backend_error: str | None = None
        """The message of an error event the decode sent in-band (held back, not relayed)."""
        self.prompt_tokens: int | None = None
        """The original prompt's tokens: pdlb's count, then the first prefill's."""
        self.prefill: PrefillResult | None = None
        """The first leg's prefill (its usage is the one the client is told)."""
        self.id: Any = None
        self.created: Any = None
        self.model: Any = None
        self.index = 0
        self.role_sent = False
        self.texts: list[str] = []
        self.token_ids: list[int] | None = None
        self.prompt_token_ids: list[int] | None = None
        self.chunks = 0
        self.finish: str | None = None
        self.usage_sent = False
        self.tools = False
        self.reasoning = False

    # ------------------------------------------------------------------ reading the stream
    def settle(self) -> None:
        """Parse the pieces recorded so far (called once the stream broke)."""
        if not self.pieces:
            return
        data, self.pieces = b"".join(self.pieces), []
        for event in _EVENT_END.split(data):
            event = event.strip()
            if not event.startswith(b"data:"):
                continue
            payload = event[5:].strip()
            if payload == b"[DONE]":
                continue
            try:
                parsed = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if isinstance(parsed, dict):
                self.absorb(parsed)

    def absorb(self, chunk: Mapping[str, Any]) -> None:
        """Take one event the client was sent into account."""
        if self.id is None:
            self.id = chunk.get("id")
            self.created = chunk.get("created")
            self.model = chunk.get("model")
        prompt_ids = chunk.get("prompt_token_ids")  # chat: on the first chunk's top level
        if isinstance(prompt_ids, list):
            self.prompt_token_ids = prompt_ids
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        if not choices and chunk.get("usage"):
            self.usage_sent = True
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            self.index = choice.get("index", self.index)
            counts = True
            if self.chat:
                delta = choice.get("delta") or {}
                if delta.get("role"):
                    self.role_sent = True
                text = delta.get("content")
                if delta.get("tool_calls"):
                    self.tools = True
                if delta.get("reasoning_content") or delta.get("reasoning"):
                    self.reasoning = True
                # vLLM's chat sends no chunk for a token whose text is held back, and a
                # role chunk carries none: count the chunks that carry text.
                counts = bool(text) or bool(choice.get("token_ids"))
            else:
                text = choice.get("text")
                ids = choice.get("prompt_token_ids")
                if isinstance(ids, list):
                    self.prompt_token_ids = ids
            if isinstance(text, str) and text:
                self.texts.append(text)
            ids = choice.get("token_ids")
            if isinstance(ids, list):
                if self.token_ids is None:
                    self.token_ids = []
                self.token_ids.extend(ids)
            if counts:
                self.chunks += 1
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    @property
    def generated(self) -> int:
        """Tokens generated so far: exact with token ids, else one per chunk (vLLM streams
        one chunk per token; docs/migration.md says where that is off)."""
        return len(self.token_ids) if self.token_ids is not None else self.chunks

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def why_not(self) -> str | None:
        """Why the stream cannot be continued now that it broke (None: it can)."""
        if self.refused is not None:
            return self.refused
        if self.tools:
            return "a tool call was being streamed"
        if self.reasoning:
            return "reasoning content was being streamed"
        return None


def refusal(endpoint: str, body: Mapping[str, Any]) -> str | None:
    """Why a request's stream would never be continued exactly enough (None: it may be)."""
    if (body.get("n") or 1) != 1 or (body.get("best_of") or 1) != 1:
        return "n > 1"
    if body.get("use_beam_search"):
        return "beam search"
    if body.get("echo"):
        return "echo"
    if body.get("prompt_logprobs") is not None:
        return "prompt_logprobs"
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        return "structured output (response_format)"
    if any(body.get(name) is not None for name in _STRUCTURED):
        return "structured output"
    if endpoint == "completions":
        if body.get("logprobs") is not None:
            return "completions logprobs (text_offset would restart)"
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) \
                and len(prompt) != 1:
            return "several prompts"
    else:
        choice = body.get("tool_choice")
        if choice == "required" or isinstance(choice, dict):
            return "a forced tool call"
    return None


def continuation(endpoint: str, t: Transcript) -> dict[str, Any] | str:
    """The body that continues ``t`` (built from the client's body), or why there is none."""
    body = t.origin
    done = t.generated
    out = dict(body)
    if done == 0:
        return out  # nothing generated yet (a role chunk at most): the request as it was
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
            prompt = prompt[0]
        prompt_ids = prompt if isinstance(prompt, list) else t.prompt_token_ids
        if t.token_ids is not None and prompt_ids is not None:
            out["prompt"] = [*prompt_ids, *t.token_ids]
        elif isinstance(prompt, str):
            out["prompt"] = prompt + t.text
        else:
            return "a token-id prompt, and the stream carried no token ids"
        limit = body.get("max_tokens")
        out["max_tokens"] = (COMPLETIONS_DEFAULT_MAX_TOKENS if limit is None else limit) - done
        if out["max_tokens"] < 1:
            return "no tokens left to generate"
    else:
        if not t.text:  # tokens whose text is held back: an empty message would be closed
            return "no generated text to continue from"
        messages = list(body["messages"])
        last = messages[-1] if messages else None
        if (body.get("continue_final_message") and isinstance(last, dict)
                and last.get("role") == "assistant" and isinstance(last.get("content"), str)):
            messages[-1] = {**last, "content": last["content"] + t.text}
        else:
            messages.append({"role": "assistant", "content": t.text})
        out["messages"] = messages
        out["continue_final_message"] = True
        out["add_generation_prompt"] = False
        for name in ("max_completion_tokens", "max_tokens"):
            limit = body.get(name)
            if limit is not None:
                out[name] = limit - done
                if out[name] < 1:
                    return "no tokens left to generate"
    min_tokens = body.get("min_tokens")
    if isinstance(min_tokens, int) and min_tokens:
        out["min_tokens"] = max(0, min_tokens - done)
    return out
