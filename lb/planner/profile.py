"""Per-server capacity: what one prefill and one decode server can do.

A :class:`Profile` holds the coefficients of the emulator's documented step model
(docs/emulator.md, "The performance model"), which is also a fair first-order description of
vLLM's scheduler:

* prefill: one prompt of ``L`` uncached tokens alone takes ``ceil(L / B) * fixed + L / R``
  (``B`` = max_num_batched_tokens per step, ``fixed`` = a step's overhead, ``R`` = tokens/s);
  saturated with batched chunks a server does ``B / (fixed + B / R)`` tokens/s;
* decode: one step with ``n`` running sequences of mean context ``c`` lasts
  ``base + per_seq * n + per_kv_token * n * c`` — that step is the inter-token latency;
* KV: at most ``kv_capacity_tokens`` tokens and ``max_num_seqs`` sequences per decode server;
* transfer: one prompt's KV moves in ``latency + L * bytes_per_token / bandwidth``.

The numbers come either from a measurement (:mod:`lb.planner.measure`: a least-squares fit
of the sweep's points, which are kept in the file) or from an emulator configuration
(:func:`from_emulator`: its knobs are the coefficients). The JSON file is what
``pdlb plan profile`` writes and ``pdlb plan --profile`` / ``[planner] profile`` read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

SCHEMA = "pdlb.plan.profile/1"

_EMULATOR_KNOBS = ("step_base_ms", "decode_per_seq_ms", "decode_per_kv_token_us",
                   "prefill_tokens_per_s", "max_num_batched_tokens", "max_num_seqs",
                   "kv_capacity_tokens", "kv_bytes_per_token", "kv_transfer_latency_ms",
                   "kv_transfer_bandwidth_gb_s", "block_size", "max_model_len")


class ProfileError(ValueError):
    """A profile file that cannot be read or does not describe a usable server."""


@dataclass(frozen=True)
class PrefillCapacity:
    fixed_ms: float
    """Overhead of one step (scheduling, launches, sampling; for a measurement, the HTTP
    round trip too)."""
    tokens_per_s: float
    """Marginal prefill throughput: the slope's inverse."""
    max_batched_tokens: int
    """Tokens per step (vLLM's max_num_batched_tokens): the chunk size."""
    points: tuple[Mapping[str, float], ...] = ()
    """The measured sweep: prompt_tokens, batch, seconds (until the batch's last answer)."""

    def alone_s(self, tokens: float) -> float:
        """Seconds one prompt of ``tokens`` uncached tokens takes on an idle server."""
        steps = max(1, math.ceil(tokens / self.max_batched_tokens))
        return steps * self.fixed_ms / 1e3 + tokens / self.tokens_per_s

    @property
    def saturated_tokens_per_s(self) -> float:
        """Throughput of a server whose every step is a full chunk."""
        b = self.max_batched_tokens
        return b / (self.fixed_ms / 1e3 + b / self.tokens_per_s)


@dataclass(frozen=True)
class DecodeCapacity:
    base_ms: float
    per_seq_ms: float
    per_kv_token_us: float
    kv_capacity_tokens: int
    max_num_seqs: int
    points: tuple[Mapping[str, float], ...] = ()
    """The measured sweep: concurrency, context (mean tokens per sequence), itl_ms."""

    def itl_s(self, running: float, context: float) -> float:
        """One decode step with ``running`` sequences of mean ``context`` tokens."""
        return (self.base_ms + self.per_seq_ms * running) / 1e3 + (
            self.per_kv_token_us * running * context / 1e6)


@dataclass(frozen=True)
class TransferCapacity:
    latency_ms: float
    bandwidth_gb_s: float
    bytes_per_token: int

    def time_s(self, tokens: float) -> float:
        return self.latency_ms / 1e3 + tokens * self.bytes_per_token / (self.bandwidth_gb_s * 1e9)

    def bytes_per_s(self) -> float:
        return self.bandwidth_gb_s * 1e9


@dataclass(frozen=True)
class Profile:
    prefill: PrefillCapacity
    decode: DecodeCapacity
    transfer: TransferCapacity
    source: str
    """Where the numbers come from ("measured http://...", "emulator defaults", ...)."""
    emulator: Mapping[str, Any] = field(default_factory=dict)
    """EmulatorConfig knobs that reproduce this server (the simulation starts a fleet of
    such emulators); ``prefill.`` / ``decode.`` prefixed keys apply to one role only."""

    def emulator_overrides(self, role: str) -> dict[str, Any]:
        """The knobs for an emulated server of ``role`` (prefill or decode)."""
        out = {k: v for k, v in self.emulator.items() if "." not in k}
        prefix = role + "."
        out.update({k[len(prefix):]: v for k, v in self.emulator.items()
                    if k.startswith(prefix)})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "source": self.source, "prefill": asdict(self.prefill),
                "decode": asdict(self.decode), "transfer": asdict(self.transfer),
                "emulator": dict(self.emulator)}

    def write(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2))
        return p


def _section(data: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    sec = data.get(name)
    if not isinstance(sec, dict):
        raise ProfileError(f"{where}: missing object {name!r}")
    return sec


def _num(sec: Mapping[str, Any], key: str, where: str, *, positive: bool = True) -> float:
    v = sec.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ProfileError(f"{where}: {key} must be a number, got {v!r}")
    if (v <= 0) if positive else (v < 0):
        raise ProfileError(f"{where}: {key} must be {'> 0' if positive else '>= 0'}, got {v}")
    return float(v)


def from_dict(data: Any, where: str = "profile") -> Profile:
    """Validate and build a profile; errors name the file and the key."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ProfileError(f"{where}: not a planner profile (schema {SCHEMA!r} expected;"
                           " write one with `pdlb plan profile`)")
    pf = _section(data, "prefill", where)
    dc = _section(data, "decode", where)
    tr = _section(data, "transfer", where)
    prefill = PrefillCapacity(
        fixed_ms=_num(pf, "fixed_ms", f"{where}: prefill", positive=False),
        tokens_per_s=_num(pf, "tokens_per_s", f"{where}: prefill"),
        max_batched_tokens=int(_num(pf, "max_batched_tokens", f"{where}: prefill")),
        points=tuple(pf.get("points") or ()))
    decode = DecodeCapacity(
        base_ms=_num(dc, "base_ms", f"{where}: decode"),
        per_seq_ms=_num(dc, "per_seq_ms", f"{where}: decode", positive=False),
        per_kv_token_us=_num(dc, "per_kv_token_us", f"{where}: decode", positive=False),
        kv_capacity_tokens=int(_num(dc, "kv_capacity_tokens", f"{where}: decode")),
        max_num_seqs=int(_num(dc, "max_num_seqs", f"{where}: decode")),
        points=tuple(dc.get("points") or ()))
    transfer = TransferCapacity(
        latency_ms=_num(tr, "latency_ms", f"{where}: transfer", positive=False),
        bandwidth_gb_s=_num(tr, "bandwidth_gb_s", f"{where}: transfer"),
        bytes_per_token=int(_num(tr, "bytes_per_token", f"{where}: transfer")))
    emulator = data.get("emulator") or {}
    if not isinstance(emulator, dict):
        raise ProfileError(f"{where}: emulator must be an object of EmulatorConfig knobs")
    return Profile(prefill, decode, transfer, str(data.get("source") or where), emulator)


def load(path: str | Path) -> Profile:
    p = Path(path)
    try:
        data = orjson.loads(p.read_bytes())
    except OSError as exc:
        raise ProfileError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    except orjson.JSONDecodeError as exc:
        raise ProfileError(f"{p}: not JSON: {exc}") from exc
    return from_dict(data, str(p))


def from_emulator(overrides: Mapping[str, Any] | None = None, source: str | None = None
                  ) -> Profile:
    """The profile an emulator with these knobs has by construction (its documented model)."""
    from emulator.config import EmulatorConfig

    cfg = EmulatorConfig().replace(**dict(overrides or {}))
    knobs = {k: getattr(cfg, k) for k in _EMULATOR_KNOBS}
    return Profile(
        prefill=PrefillCapacity(cfg.step_base_ms, cfg.prefill_tokens_per_s,
                                cfg.max_num_batched_tokens),
        decode=DecodeCapacity(cfg.step_base_ms, cfg.decode_per_seq_ms,
                              cfg.decode_per_kv_token_us, cfg.kv_capacity_tokens,
                              cfg.max_num_seqs),
        transfer=TransferCapacity(cfg.kv_transfer_latency_ms, cfg.kv_transfer_bandwidth_gb_s,
                                  cfg.kv_bytes_per_token),
        source=source or ("emulator " + ", ".join(f"{k}={v}" for k, v in
                                                  sorted((overrides or {}).items()))
                          if overrides else "emulator defaults"),
        emulator=knobs)


def fit_prefill(points: Sequence[Mapping[str, float]], max_batched_tokens: int
                ) -> tuple[float, float]:
    """(fixed_ms, tokens_per_s) by least squares of ``seconds = steps * fixed + tokens / R``
    over the sweep (``tokens`` = batch x prompt, ``steps`` = the chunks those need)."""
    import numpy as np

    if len(points) < 2:
        raise ProfileError("prefill fit needs at least two measured points")
    rows, ys = [], []
    for p in points:
        tokens = p["prompt_tokens"] * p["batch"]
        rows.append([max(1.0, math.ceil(tokens / max_batched_tokens)), tokens])
        ys.append(p["seconds"])
    coef = np.linalg.lstsq(np.array(rows), np.array(ys), rcond=None)[0]
    fixed, slope = float(coef[0]), float(coef[1])
    if slope <= 0:
        raise ProfileError(f"prefill fit: time does not grow with prompt length ({slope:g} s"
                           " per token): measure longer prompts")
    if fixed < 0:  # the intercept is noise: refit through the origin
        fixed = 0.0
        slope = float(np.dot(ys, [r[1] for r in rows]) / np.dot([r[1] for r in rows],
                                                                 [r[1] for r in rows]))
    return fixed * 1e3, 1.0 / slope


def fit_decode(points: Sequence[Mapping[str, float]]) -> tuple[float, float, float]:
    """(base_ms, per_seq_ms, per_kv_token_us) by non-negative least squares of
    ``itl = base + per_seq * n + per_kv * n * context``."""
    import numpy as np

    if len(points) < 3:
        raise ProfileError("decode fit needs at least three measured points")
    a = np.array([[1.0, p["concurrency"], p["concurrency"] * p["context"]] for p in points])
    y = np.array([p["itl_ms"] / 1e3 for p in points])
    cols = [0, 1, 2]
    while True:  # drop a column whose coefficient comes out negative (tiny NNLS)
        coef = np.linalg.lstsq(a[:, cols], y, rcond=None)[0]
        neg = [c for c, v in zip(cols, coef, strict=True) if v < 0 and c != 0]
        if not neg:
            break
        cols.remove(neg[0])
    full = dict(zip(cols, (float(v) for v in coef), strict=True))
    base = full.get(0, 0.0)
    if base <= 0:
        raise ProfileError("decode fit: no positive base step time; measure low concurrency")
    return base * 1e3, full.get(1, 0.0) * 1e3, full.get(2, 0.0) * 1e6
