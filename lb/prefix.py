"""Prefix hashes of a prompt, for cache-aware routing.

Two prompts that share their first k blocks share their first k hashes. Hash i covers blocks
0..i (a running CRC-32 over the prompt's UTF-8 bytes, continued block after block), so a
policy compares tuples element-wise and needs no tokenizer. Blocks are ``BLOCK_BYTES`` of
the rendered prompt — about 16 tokens, vLLM's default KV block — and only the first
``MAX_BLOCKS`` are hashed, which bounds the cost on huge prompts (~20 µs for 16 KiB).
CRC-32 is deterministic across processes, so several pdlb workers agree on the hashes.

Chat prompts are rendered from ALL messages in order (role and content), not just the
first one: a shared system prompt and a shared conversation history both count.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

from lb.tokens import prompt_pieces

BLOCK_BYTES = 64
MAX_BLOCKS = 256


def rendered_prompt(endpoint: str, body: Mapping[str, Any]) -> bytes:
    texts, _ = prompt_pieces(endpoint, body)
    if texts:
        return "\x00".join(texts).encode("utf-8", "surrogatepass")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return b"".join(t.to_bytes(4, "little", signed=False) for t in prompt[: MAX_BLOCKS * 16]
                        if 0 <= t < 1 << 32)
    return b""


def prefix_hashes(endpoint: str, body: Mapping[str, Any],
                  seed: str | None = None) -> tuple[int, ...]:
    """Cumulative hashes of the prompt's leading blocks (a partial last block is dropped).
    ``seed`` (a LoRA adapter's name) starts the chain elsewhere: the same prompt under
    another adapter has other KV, so it must not look cached where the base model ran."""
    data = rendered_prompt(endpoint, body)
    blocks = min(len(data) // BLOCK_BYTES, MAX_BLOCKS)
    hashes = []
    value = 0 if seed is None else zlib.crc32(seed.encode("utf-8", "surrogatepass"))
    view = memoryview(data)
    for i in range(blocks):
        value = zlib.crc32(view[i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES], value)
        hashes.append(value)
    return tuple(hashes)
