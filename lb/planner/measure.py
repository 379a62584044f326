"""``pdlb plan profile``: a short sweep against one prefill and one decode server.

Speaks only the OpenAI API every vLLM serves (plus ``/metrics``), so it runs against real
vLLM as against the emulator:

* prefill: ``batch`` simultaneous non-streamed completions of ``prompt_tokens`` random token
  ids (distinct per request: no prefix-cache hits) with ``max_tokens`` 1; the time until the
  batch's last answer is one point. Fit: ``seconds = steps x fixed + tokens / R``.
* decode: ``concurrency`` simultaneous streams of ``context``-token prompts generating
  ``max_tokens`` tokens (``ignore_eos``); the median gap between tokens while all streams
  are decoding is the ITL of that point. Fit: ``itl = base + per_seq n + per_kv n ctx``.
  A decode server answers plain requests (no ``kv_transfer_params``) as a colocated one.
* KV capacity: ``vllm:cache_config_info`` in the decode server's ``/metrics`` (vLLM), else
  the emulator's ``/_emulator/state``, else ``--kv-capacity-tokens``.

``time_scale`` multiplies measured seconds (an emulator run with ``--time-scale S``).
Transfer latency/bandwidth are not measured (they need a pair and the NIC): flags.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from lb.planner.profile import (
    DecodeCapacity,
    PrefillCapacity,
    Profile,
    ProfileError,
    TransferCapacity,
    fit_decode,
    fit_prefill,
)

_CAPACITY_TOKENS = re.compile(r'kv_cache_size_tokens="(\d+)"')
_GPU_BLOCKS = re.compile(r'num_gpu_blocks="(\d+)"')
_BLOCK_SIZE = re.compile(r'block_size="(\d+)"')


@dataclass(frozen=True)
class Sweep:
    prompt_lengths: Sequence[int] = (128, 512, 2048, 4096)
    prefill_batches: Sequence[int] = (1, 4)
    concurrencies: Sequence[int] = (1, 8, 32, 64)
    contexts: Sequence[int] = (128, 1024)
    decode_tokens: int = 32
    max_batched_tokens: int = 8192
    max_num_seqs: int = 1024
    kv_capacity_tokens: int | None = None
    block_size: int = 16
    transfer_latency_ms: float = 1.5
    transfer_bandwidth_gb_s: float = 25.0
    kv_bytes_per_token: int = 131_072
    time_scale: float = 1.0
    timeout_s: float = 300.0


_WORDS = ("time year people way day man thing woman life child world school state family"
          " student group country problem hand part place case week company system program"
          " question work government number night point home water room mother area money"
          " story fact month lot right study book eye job word business issue side kind head"
          " house service friend father power hour game line end member law car city")

_VOCAB: list[int] = [*range(1000, 30000)]
"""Token ids prompts are drawn from: replaced by what the server's /tokenize gives for
plain English words (a tiny test model's vocabulary can be far smaller than 30,000)."""


async def _valid_ids(session: aiohttp.ClientSession, url: str, model: str) -> list[int]:
    """Ids the server accepts: its own tokenization of common words (vLLM and the emulator
    both serve /tokenize); the default range when it has no /tokenize."""
    body = {"model": model, "prompt": " ".join(_WORDS.split() * 4)}
    try:
        async with session.post(url + "/tokenize", json=body) as resp:
            if resp.status == 200:
                ids = sorted({int(t) for t in (await resp.json()).get("tokens", [])})
                if len(ids) >= 20:
                    return ids
    except (aiohttp.ClientError, ValueError, TypeError):
        pass
    return list(_VOCAB)


def _ids(rng: random.Random, n: int, vocab: Sequence[int] = _VOCAB) -> list[int]:
    return [vocab[rng.randrange(len(vocab))] for _ in range(n)]


async def _model(session: aiohttp.ClientSession, url: str) -> tuple[str, int]:
    """The served model and its context length (vLLM's ``max_model_len``; 8192 if absent)."""
    async with session.get(url + "/v1/models") as resp:
        if resp.status != 200:
            raise ProfileError(f"{url}/v1/models answered {resp.status}")
        data = await resp.json()
    try:
        card = data["data"][0]
        length = card.get("max_model_len")
        return str(card["id"]), int(length) if isinstance(length, int) and length > 0 else 8192
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ProfileError(f"{url}/v1/models lists no model") from exc


async def _complete(session: aiohttp.ClientSession, url: str, body: Mapping[str, Any]) -> None:
    async with session.post(url + "/v1/completions", data=orjson.dumps(body),
                            headers={"Content-Type": "application/json"}) as resp:
        text = await resp.read()
        if resp.status != 200:
            raise ProfileError(f"{url}/v1/completions answered {resp.status}: {text[:200]!r}")


async def _stream(session: aiohttp.ClientSession, url: str, body: Mapping[str, Any]
                  ) -> list[float]:
    """Arrival times (monotonic) of the stream's token events."""
    times: list[float] = []
    async with session.post(url + "/v1/completions", data=orjson.dumps(body),
                            headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            raise ProfileError(f"{url}/v1/completions answered {resp.status}:"
                               f" {(await resp.read())[:200]!r}")
        async for line in resp.content:
            if line.startswith(b"data: {"):
                times.append(time.monotonic())
    return times


async def measure_prefill(session: aiohttp.ClientSession, url: str, model: str, sweep: Sweep,
                          max_prompt: int, rng: random.Random) -> list[dict[str, float]]:
    points = []
    vocab = await _valid_ids(session, url, model)
    await _complete(session, url, {"model": model, "prompt": _ids(rng, 16, vocab),
                                   "max_tokens": 1})
    for length in sweep.prompt_lengths:
        length = min(length, max_prompt)
        for batch in sweep.prefill_batches:
            bodies = [{"model": model, "prompt": _ids(rng, length, vocab), "max_tokens": 1}
                      for _ in range(batch)]
            t0 = time.monotonic()
            await asyncio.gather(*(_complete(session, url, b) for b in bodies))
            seconds = (time.monotonic() - t0) * sweep.time_scale
            points.append({"prompt_tokens": length, "batch": batch, "seconds": seconds})
    return points


async def measure_decode(session: aiohttp.ClientSession, url: str, model: str, sweep: Sweep,
                         max_prompt: int, rng: random.Random) -> list[dict[str, float]]:
    points = []
    vocab = await _valid_ids(session, url, model)
    m = sweep.decode_tokens
    for context in sweep.contexts:
        context = min(context, max_prompt - m)
        for n in sweep.concurrencies:
            bodies = [{"model": model, "prompt": _ids(rng, context, vocab), "max_tokens": m,
                       "ignore_eos": True, "stream": True} for _ in range(n)]
            streams = await asyncio.gather(*(_stream(session, url, b) for b in bodies))
            if any(len(s) < 4 for s in streams):
                raise ProfileError(f"{url}: streams of {m} tokens came back with fewer than"
                                   " 4 token events")
            start = max(s[0] for s in streams)  # every stream past its prefill
            end = min(s[-1] for s in streams)   # none finished yet
            gaps = [b - a for s in streams for a, b in itertools.pairwise(s)
                    if a >= start and b <= end]
            if len(gaps) < 3:  # the streams hardly overlapped: use every gap after prefill
                gaps = [b - a for s in streams for a, b in itertools.pairwise(s[1:])]
            itl = statistics.median(gaps) * sweep.time_scale
            points.append({"concurrency": n, "context": context + m / 2,
                           "itl_ms": itl * 1e3})
    return points


async def kv_capacity(session: aiohttp.ClientSession, url: str, sweep: Sweep) -> int:
    if sweep.kv_capacity_tokens is not None:
        return sweep.kv_capacity_tokens
    async with session.get(url + "/metrics") as resp:
        text = await resp.text() if resp.status == 200 else ""
    total = 0
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info"):
            match = _CAPACITY_TOKENS.search(line)
            blocks, size = _GPU_BLOCKS.search(line), _BLOCK_SIZE.search(line)
            if match:
                total += int(match.group(1))
            elif blocks and size:
                total += int(blocks.group(1)) * int(size.group(1))
    if total:
        return total
    async with session.get(url + "/_emulator/state") as resp:
        if resp.status == 200:
            state = await resp.json()
            blocks = state.get("kv_total_blocks")
            if isinstance(blocks, int) and blocks > 0:
                return blocks * sweep.block_size
    raise ProfileError(f"{url}: no KV capacity in /metrics (vllm:cache_config_info):"
                       " give --kv-capacity-tokens")


async def profile_servers(prefill_url: str, decode_url: str, sweep: Sweep,
                          emulator: Mapping[str, Any] | None = None,
                          source: str | None = None) -> Profile:
    """Measure both servers and fit the profile (the points are kept in it)."""
    prefill_url, decode_url = prefill_url.rstrip("/"), decode_url.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=sweep.timeout_s)
    rng = random.Random(19)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            model, p_len = await _model(session, prefill_url)
            d_model, d_len = await _model(session, decode_url)
            p_points = await measure_prefill(session, prefill_url, model, sweep, p_len - 2, rng)
            d_points = await measure_decode(session, decode_url, d_model, sweep, d_len - 2,
                                            rng)
            capacity = await kv_capacity(session, decode_url, sweep)
        except aiohttp.ClientError as exc:
            raise ProfileError(f"cannot measure: {exc}") from exc
    fixed_ms, tokens_per_s = fit_prefill(p_points, sweep.max_batched_tokens)
    base_ms, per_seq_ms, per_kv_us = fit_decode(d_points)
    return Profile(
        prefill=PrefillCapacity(fixed_ms, tokens_per_s, sweep.max_batched_tokens,
                                tuple(p_points)),
        decode=DecodeCapacity(base_ms, per_seq_ms, per_kv_us, capacity, sweep.max_num_seqs,
                              tuple(d_points)),
        transfer=TransferCapacity(sweep.transfer_latency_ms, sweep.transfer_bandwidth_gb_s,
                                  sweep.kv_bytes_per_token),
        source=source or f"measured prefill {prefill_url}, decode {decode_url}",
        emulator=dict(emulator) if emulator is not None else _fitted_knobs(
            fixed_ms, tokens_per_s, base_ms, per_seq_ms, per_kv_us, capacity, sweep),
    )


def _fitted_knobs(fixed_ms: float, tokens_per_s: float, base_ms: float, per_seq_ms: float,
                  per_kv_us: float, capacity: int, sweep: Sweep) -> dict[str, Any]:
    """Emulator knobs that reproduce a measured server (for the simulation check)."""
    return {"prefill.step_base_ms": max(fixed_ms, 0.1), "decode.step_base_ms": base_ms,
            "prefill_tokens_per_s": tokens_per_s, "decode_per_seq_ms": per_seq_ms,
            "decode_per_kv_token_us": per_kv_us,
            "max_num_batched_tokens": sweep.max_batched_tokens,
            "max_num_seqs": sweep.max_num_seqs,
            "kv_capacity_tokens": max(capacity, 8192),
            "kv_bytes_per_token": sweep.kv_bytes_per_token,
            "kv_transfer_latency_ms": sweep.transfer_latency_ms,
            "kv_transfer_bandwidth_gb_s": sweep.transfer_bandwidth_gb_s}
