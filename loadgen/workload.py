"""Workloads: what each request asks for.

A workload maps a request index to an :class:`Item` (one or more turns of a conversation),
deterministically from the seed, so that worker processes can each build their own slice of
the same run without talking to each other.

Sources:
- random prompts with length distributions, in real tokens of the client tokenizer;
- shared-prefix groups: N system prompts, each shared by M questions (exercises cache-aware
  routing);
- multi-turn sessions (``turns`` > 1): each turn's prompt carries the conversation so far,
  with the server's actual answers;
- JSONL files: one request per line, ``prompt`` or ``messages``, optional ``max_tokens`` and
  ``timestamp`` (seconds; a file with timestamps can be replayed as a trace);
- ShareGPT-format JSON: ``[{"conversations": [{"from": "human", "value": ...}, ...]}]``.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from loadgen.tokenizer import Tokenizer

Message = dict[str, Any]


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A token-length distribution: ``normal`` (truncated), ``lognormal`` or ``uniform``.

    ``uniform`` draws between ``min`` and ``max``; the others use mean and std and are cut
    to [min, max]. std 0 means every request gets ``mean``.
    """

    mean: int
    std: float = 0.0
    min: int = 1
    max: int | None = None
    dist: str = "normal"

    def __post_init__(self) -> None:
        if self.dist not in ("normal", "lognormal", "uniform"):
            raise ValueError(f"unknown length distribution {self.dist!r}: "
                             "choose normal, lognormal or uniform")
        if self.mean < 1 or self.min < 1:
            raise ValueError(f"lengths must be >= 1 token (mean {self.mean}, min {self.min})")
        if self.std < 0:
            raise ValueError(f"length std must be >= 0, got {self.std}")
        if self.max is not None and self.max < self.min:
            raise ValueError(f"length max {self.max} < min {self.min}")
        if self.dist == "uniform" and self.max is None:
            raise ValueError("a uniform length distribution needs a max")

    def sample(self, rng: random.Random) -> int:
        hi = self.max if self.max is not None else math.inf
        if self.dist == "uniform":
            return rng.randint(self.min, int(hi))
        if self.std == 0:
            return int(min(max(self.mean, self.min), hi))
        for _ in range(32):  # truncated: redraw outside [min, max], then clip
            if self.dist == "normal":
                v = rng.gauss(self.mean, self.std)
            else:
                s2 = math.log1p((self.std / self.mean) ** 2)
                v = rng.lognormvariate(math.log(self.mean) - s2 / 2.0, math.sqrt(s2))
            n = round(v)
            if self.min <= n <= hi:
                return int(n)
        return int(min(max(round(v), self.min), hi))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "min": self.min, "max": self.max,
                "dist": self.dist}


@dataclass(frozen=True, slots=True)
class Turn:
    """One request of a conversation: either a user text or a full message list."""

    max_tokens: int
    text: str | None = None
    messages: tuple[Message, ...] | None = None
    input_len: int | None = None


@dataclass(frozen=True, slots=True)
class Item:
    """What one scheduled arrival sends: a single request, or a session of several turns."""

    index: int
    turns: tuple[Turn, ...]
    system: str | None = None
    group: int | None = None
    timestamp: float | None = None


@dataclass(frozen=True, slots=True)
class Mix:
    """A named workload preset; explicit flags override it."""

    name: str
    description: str
    input_len: LengthDist
    output_len: LengthDist
    endpoint: str | None = None
    turns: int = 1


MIXES: dict[str, Mix] = {
    m.name: m for m in (
        Mix("input-heavy", "agents / RAG: long prompts, short answers (prefill-bound)",
            LengthDist(2048, 512, 512, 4096), LengthDist(128, 32, 32, 256)),
        Mix("output-heavy", "generation: short prompts, long answers (decode-bound)",
            LengthDist(256, 64, 64, 512), LengthDist(1024, 256, 256, 2048)),
        Mix("chat", "chat sessions: mid-size turns, 3-turn conversations, chat endpoint",
            LengthDist(384, 192, 32, 1024), LengthDist(256, 128, 32, 768),
            endpoint="chat", turns=3),
    )
}


def item_rng(seed: int, index: int, salt: int = 0) -> random.Random:
    """A generator private to one request, so any process can rebuild request i alone."""
    return random.Random((seed * 0x9E3779B1 + index * 0x85EBCA77 + salt) & (2**63 - 1))


class TextMaker:
    """Strings of exactly N client-tokenizer tokens, made of random plain-word tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._words = tokenizer.words()

    def make(self, rng: random.Random, n: int) -> str:
        return "".join(rng.choices(self._words, k=n))


class Workload:
    """Base: ``item(i)`` for every request index; ``size`` when the source is finite."""

    name = "workload"
    size: int | None = None

    def item(self, index: int) -> Item:
        raise NotImplementedError

    def timestamps(self) -> list[float | None] | None:
        """Per-item timestamps of a trace, else None."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name}


@dataclass
class RandomWorkload(Workload):
    """Random prompts; optionally shared-prefix groups and multi-turn sessions."""

    text: TextMaker
    input_len: LengthDist
    output_len: LengthDist
    seed: int = 0
    turns: int = 1
    prefix_groups: int = 0
    prefix_len: int = 0
    questions_per_group: int = 1
    _prefixes: dict[int, str] = field(default_factory=dict, repr=False)
    _perm: list[int] | None = field(default=None, repr=False)

    name = "random"

    def __post_init__(self) -> None:
        if self.turns < 1:
            raise ValueError(f"turns must be >= 1, got {self.turns}")
        if self.prefix_groups < 0 or self.questions_per_group < 1 or self.prefix_len < 0:
            raise ValueError("shared prefix needs groups >= 0, questions per group >= 1 "
                             "and prefix length >= 0")
        if self.prefix_groups and not self.prefix_len:
            raise ValueError("shared-prefix groups need a prefix length > 0 tokens")
        if self.prefix_groups:
            epoch = self.prefix_groups * self.questions_per_group
            perm = list(range(epoch))
            random.Random(self.seed).shuffle(perm)
            self._perm = perm

    def _prefix(self, group: int) -> str:
        text = self._prefixes.get(group)
        if text is None:
            text = self.text.make(item_rng(self.seed, group, salt=0x5EED), self.prefix_len)
            self._prefixes[group] = text
        return text

    def item(self, index: int) -> Item:
        rng = item_rng(self.seed, index)
        turns = []
        for _ in range(self.turns):
            n_in = self.input_len.sample(rng)
            n_out = self.output_len.sample(rng)
            turns.append(Turn(max_tokens=n_out, text=self.text.make(rng, n_in), input_len=n_in))
        group = system = None
        if self._perm is not None:
            group = self._perm[index % len(self._perm)] // self.questions_per_group
            system = self._prefix(group)
        return Item(index=index, turns=tuple(turns), system=system, group=group)

    def describe(self) -> dict[str, Any]:
        return {"kind": "random", "tokenizer": self.text.tokenizer.name,
                "input_len": self.input_len.to_dict(), "output_len": self.output_len.to_dict(),
                "turns": self.turns, "prefix_groups": self.prefix_groups,
                "prefix_len": self.prefix_len, "questions_per_group": self.questions_per_group}


@dataclass
class ListWorkload(Workload):
    """Items from a file (JSONL or ShareGPT), in a seeded order, cycled when exhausted."""

    items: list[Item]
    source: str
    kind: str
    shuffle: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.items:
            raise ValueError(f"{self.source}: no usable requests")
        if self.shuffle:
            random.Random(self.seed).shuffle(self.items)
        self.size = len(self.items)
        self.name = self.kind

    def item(self, index: int) -> Item:
        base = self.items[index % len(self.items)]
        return Item(index=index, turns=base.turns, system=base.system, group=base.group,
                    timestamp=base.timestamp)

    def timestamps(self) -> list[float | None] | None:
        ts = [it.timestamp for it in self.items]
        return ts if any(t is not None for t in ts) else None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.source, "size": len(self.items)}


def load_jsonl(path: str | Path, output_len: LengthDist, seed: int = 0) -> ListWorkload:
    """One request per line: ``prompt`` | ``messages``, ``max_tokens``, ``timestamp``."""
    rng = random.Random(seed)
    items: list[Item] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            raw = raw.strip()
            if not raw:
                continue
            where = f"{path}:{lineno}"
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{where}: each line must be a JSON object")
            prompt, messages = row.get("prompt"), row.get("messages")
            if (prompt is None) == (messages is None):
                raise ValueError(f"{where}: give exactly one of 'prompt' or 'messages'")
            if prompt is not None and not isinstance(prompt, str):
                raise ValueError(f"{where}: 'prompt' must be a string")
            if messages is not None and not (
                isinstance(messages, list) and messages
                and all(isinstance(m, dict) and "role" in m for m in messages)
            ):
                raise ValueError(f"{where}: 'messages' must be a list of {{role, content}}")
            max_tokens = row.get("max_tokens", row.get("max_completion_tokens"))
            if max_tokens is None:
                max_tokens = output_len.sample(rng)
            if not isinstance(max_tokens, int) or max_tokens < 1:
                raise ValueError(f"{where}: 'max_tokens' must be an integer >= 1")
            ts = row.get("timestamp")
            if ts is not None and not isinstance(ts, int | float):
                raise ValueError(f"{where}: 'timestamp' must be a number of seconds")
            turn = Turn(max_tokens=max_tokens, text=prompt,
                        messages=tuple(messages) if messages is not None else None,
                        input_len=row.get("input_len"))
            items.append(Item(index=len(items), turns=(turn,),
                              timestamp=float(ts) if ts is not None else None))
    return ListWorkload(items, str(path), "jsonl")


def load_sharegpt(
    path: str | Path,
    count: Callable[[str], int],
    *,
    turns: int = 1,
    seed: int = 0,
    limit: int | None = None,
    fixed_output_len: int | None = None,
) -> ListWorkload:
    """ShareGPT conversations: human turns are prompts, the following gpt turn's length in
    client tokens is ``max_tokens``. vLLM's filter: drop prompts or answers under 4 tokens,
    prompts over 1024 or prompt + answer over 2048 tokens. Only as many conversations as
    ``limit`` are tokenised."""
    with open(path, "rb") as fh:
        try:
            data = orjson.loads(fh.read())
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    items: list[Item] = []
    for k in order:
        if limit is not None and len(items) >= limit:
            break
        conv = data[k].get("conversations") if isinstance(data[k], dict) else None
        if not isinstance(conv, list):
            continue
        pairs = _sharegpt_pairs(conv)[:turns]
        out: list[Turn] = []
        for human, gpt in pairs:
            n_in = count(human)
            n_out = fixed_output_len or count(gpt)
            if n_in < 4 or n_out < 4 or n_in > 1024 or n_in + n_out > 2048:
                break
            out.append(Turn(max_tokens=n_out, text=human, input_len=n_in))
        if out:
            items.append(Item(index=len(items), turns=tuple(out)))
    return ListWorkload(items, str(path), "sharegpt")


def _sharegpt_pairs(conv: Sequence[Any]) -> list[tuple[str, str]]:
    pairs = []
    for a, b in itertools.pairwise(conv):
        if (isinstance(a, dict) and isinstance(b, dict) and a.get("from") == "human"
                and b.get("from") == "gpt" and isinstance(a.get("value"), str)
                and isinstance(b.get("value"), str)):
            pairs.append((a["value"], b["value"]))
    return pairs


def detect_format(path: str | Path) -> str:
    """'sharegpt' for a JSON list, 'jsonl' otherwise."""
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    return "sharegpt" if head.startswith(b"[") else "jsonl"
