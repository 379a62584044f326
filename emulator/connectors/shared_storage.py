"""ExampleConnector (shared storage) and LMCache: KV files keyed by the prompt.

Prefill role: every finished request writes ``<shared_storage_path>/<prompt hash>.kv``
(its token count) and frees its blocks — nothing is held for a decode. Decode role: every
request looks its prompt up there first: a hit loads the prompt's KV (counted as
``external_kv_transfer``, ``kv_storage_hits``), a miss computes it (``local_compute``,
``kv_storage_misses``, recompute reason ``storage_miss``). The key is a hash of the prompt's
token ids and ``cache_salt``: a decode whose body renders other tokens misses, as in vLLM.
Files are never deleted (ExampleConnector does not either).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from emulator.connectors.base import Plan, Produce, ServerView, Staged
from emulator.kv import PullOutcome
from emulator.protocol import GenRequest
from emulator.tokens import mix64, prompt_digest


def storage_key(req: GenRequest) -> str:
    digest = prompt_digest(req.prompt_ids)
    if req.cache_salt:
        salt = hashlib.blake2b(req.cache_salt.encode(), digest_size=8).digest()
        digest = mix64(digest ^ int.from_bytes(salt, "little"))
    return f"{digest:016x}"


class StorageSource:
    storage = True

    def __init__(self, path: Path, key: str) -> None:
        self.file = path / f"{key}.kv"
        self.where = str(self.file)

    async def fetch(self, prompt_hash: int) -> PullOutcome:
        try:
            tokens = int(self.file.read_text())
        except (OSError, ValueError):
            return PullOutcome("storage_miss")
        return PullOutcome("ok", tokens)

    def release(self) -> None:
        pass


class SharedStorage:
    name = "shared_storage"

    def __init__(self, server: ServerView) -> None:
        self.server = server
        self.path = Path(server.config.shared_storage_path or ".")

    def plan(self, req: GenRequest) -> Plan:
        role = self.server.config.role
        if role == "prefill":
            return Plan(produce=Produce(storage_key(req), self.server.engine_id, store=True))
        if role == "decode":
            return Plan(consume=StorageSource(self.path, storage_key(req)))
        return Plan()

    def write(self, key: str, num_tokens: int) -> None:
        """Store a prompt's KV (atomically: a reader sees all of it or nothing)."""
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(str(num_tokens))
        tmp.replace(self.path / f"{key}.kv")

    def response_params(self, staged: Staged) -> dict[str, Any] | None:
        return None
