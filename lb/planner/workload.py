"""What the requests ask for: (prompt tokens, cached prompt tokens, output tokens) samples.

Three sources, one shape:

* a loadgen mix (``input-heavy``, ``output-heavy``, ``chat``) or explicit length
  distributions: sampled exactly as loadgen samples them (same seed, same generator);
* a JSONL or ShareGPT dataset, in loadgen's formats: prompt tokens counted with loadgen's
  client tokenizer (or a line's ``input_len``), output = ``max_tokens``;
* a trace: pdlb's JSON access log (``[log] format = "json"``), one line per request; only
  answered requests (status 200) with both token counts count, and the rate they arrived
  at (requests over the span of their timestamps) is kept as the observed rate.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from loadgen.workload import LengthDist


class WorkloadError(ValueError):
    """A workload source that cannot be read."""


@dataclass(frozen=True)
class Workload:
    prompts: tuple[int, ...]
    outputs: tuple[int, ...]
    cached: tuple[int, ...]
    source: str
    observed_rate: float | None = None
    """Requests/s over the trace's span (access logs only)."""

    def __post_init__(self) -> None:
        if not self.prompts:
            raise WorkloadError(f"{self.source}: no usable requests")
        if not len(self.prompts) == len(self.outputs) == len(self.cached):
            raise WorkloadError(f"{self.source}: prompts, outputs and cached differ in length")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def mean_prompt(self) -> float:
        return math.fsum(self.prompts) / len(self)

    @property
    def mean_uncached(self) -> float:
        return math.fsum(p - c for p, c in zip(self.prompts, self.cached, strict=True)) / len(self)

    @property
    def mean_output(self) -> float:
        return math.fsum(self.outputs) / len(self)

    @property
    def decode_context(self) -> float:
        """Mean KV tokens of a running decode, weighted by how long each one runs (its
        output length): sum(o * (prompt + o / 2)) / sum(o)."""
        num = math.fsum(o * (p + o / 2) for p, o in zip(self.prompts, self.outputs, strict=True))
        return num / math.fsum(self.outputs)

    def describe(self) -> str:
        return (f"{self.source}: {len(self)} requests, prompt {self.mean_prompt:.0f} tokens"
                f" ({self.mean_uncached:.0f} uncached), output {self.mean_output:.0f} tokens")


def from_lengths(source: str, prompts: Sequence[int], outputs: Sequence[int],
                 cached: Sequence[int] | None = None, rate: float | None = None) -> Workload:
    return Workload(tuple(prompts), tuple(outputs),
                    tuple(cached) if cached is not None else (0,) * len(prompts), source, rate)


def parse_length(spec: str) -> LengthDist:
    """``MEAN`` (every request that long) or ``MEAN:STD`` (normal, cut at 1 and 4 x mean)."""
    from loadgen.workload import LengthDist

    mean_s, _, std_s = spec.partition(":")
    try:
        mean = int(mean_s)
        std = float(std_s) if std_s else 0.0
        return LengthDist(mean, std, 1, max(mean * 4, mean + 1))
    except ValueError as exc:
        raise WorkloadError(f"bad length {spec!r}: expected MEAN or MEAN:STD tokens ({exc})"
                            ) from exc


def from_mix(mix: str | None = None, *, input_len: str | None = None,
             output_len: str | None = None, samples: int = 2000, seed: int = 0) -> Workload:
    """Lengths drawn as loadgen draws them (``loadgen.workload.item_rng`` per index)."""
    from loadgen.workload import MIXES, item_rng

    if mix is not None and mix not in MIXES:
        raise WorkloadError(f"unknown mix {mix!r}: choose one of {', '.join(MIXES)}")
    m = MIXES.get(mix or "")
    try:
        i_dist = parse_length(input_len) if input_len else (m.input_len if m else None)
        o_dist = parse_length(output_len) if output_len else (m.output_len if m else None)
    except ValueError as exc:
        raise WorkloadError(str(exc)) from exc
    if i_dist is None or o_dist is None:
        raise WorkloadError("give --mix, or both --input-len and --output-len")
    prompts, outputs = [], []
    for i in range(samples):
        rng = item_rng(seed, i)
        prompts.append(i_dist.sample(rng))
        outputs.append(o_dist.sample(rng))
    name = mix or f"input {input_len} / output {output_len}"
    return from_lengths(name, prompts, outputs)


def from_dataset(path: str | Path, *, fmt: str = "auto", default_output: int = 128,
                 limit: int = 2000, seed: int = 0) -> Workload:
    """A loadgen dataset; token counts with loadgen's default client tokenizer."""
    from loadgen.tokenizer import DEFAULT_TOKENIZER, load_tokenizer
    from loadgen.workload import LengthDist, detect_format, load_jsonl, load_sharegpt

    try:
        kind = detect_format(path) if fmt == "auto" else fmt
        tok = load_tokenizer(DEFAULT_TOKENIZER)
        if kind == "sharegpt":
            wl = load_sharegpt(path, tok.count, seed=seed, limit=limit)
        else:
            wl = load_jsonl(path, LengthDist(default_output), seed=seed)
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise WorkloadError(str(exc)) from exc
    prompts, outputs = [], []
    for item in wl.items[:limit]:
        turn = item.turns[0]
        if turn.input_len is not None:
            n_in = int(turn.input_len)
        elif turn.text is not None:
            n_in = tok.count(turn.text)
        else:
            n_in = sum(tok.count(str(m.get("content") or "")) + 4
                       for m in turn.messages or ()) + 5
        prompts.append(max(1, n_in))
        outputs.append(turn.max_tokens)
    return from_lengths(f"{kind} {path}", prompts, outputs)


def _epoch(stamp: object) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def from_access_log(path: str | Path, *, limit: int = 100_000) -> Workload:
    """pdlb's JSON access log: lines with ``prompt_tokens`` and ``output_tokens``; other
    log lines (start-up, warnings) are skipped."""
    prompts: list[int] = []
    outputs: list[int] = []
    cached: list[int] = []
    times: list[float] = []
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    with fh:
        for raw in fh:
            raw = raw.strip()
            if not raw.startswith(b"{"):
                continue
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(row, dict) or row.get("status") != 200:
                continue
            p, o = row.get("prompt_tokens"), row.get("output_tokens")
            if not (isinstance(p, int) and isinstance(o, int) and p > 0 and o > 0):
                continue
            c = row.get("cached_tokens")
            prompts.append(p)
            outputs.append(o)
            cached.append(min(c, p - 1) if isinstance(c, int) and c > 0 else 0)
            t = _epoch(row.get("time"))
            if t is not None:
                times.append(t)
            if len(prompts) >= limit:
                break
    if not prompts:
        raise WorkloadError(f"{path}: no access lines with status 200, prompt_tokens and"
                            " output_tokens (is it pdlb's JSON access log?)")
    rate = None
    if len(times) >= 2 and max(times) > min(times):
        rate = (len(times) - 1) / (max(times) - min(times))
    return from_lengths(f"access log {path}", prompts, outputs, cached, rate)


def resample(workload: Workload, n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """``n`` (prompt, cached, output) triples drawn from the workload with replacement."""
    rng = random.Random(seed)
    idx = [rng.randrange(len(workload)) for _ in range(n)]
    return [(workload.prompts[i], workload.cached[i], workload.outputs[i]) for i in idx]
