"""Emulated KV-transfer connectors, one module each; :func:`make_kv_mode` picks one.

See emulator/connectors/base.py for what a mode decides, and docs/connectors.md for what
each real connector does on the wire.
"""

from __future__ import annotations

from emulator.connectors.base import (
    KvMode,
    KvSource,
    KvStore,
    Plan,
    Produce,
    ServerView,
    Staged,
)
from emulator.connectors.mooncake import Mooncake, query_answer
from emulator.connectors.nixl import NixlPull
from emulator.connectors.nixl_push import NixlPush
from emulator.connectors.p2p_nccl import P2pNccl
from emulator.connectors.sglang import SGLang
from emulator.connectors.shared_storage import SharedStorage

MODES: dict[str, type[NixlPull | NixlPush | Mooncake | P2pNccl | SGLang | SharedStorage]] = {
    "nixl": NixlPull,
    "nixl_push": NixlPush,
    "mooncake": Mooncake,
    "p2p_nccl": P2pNccl,
    "sglang": SGLang,
    "shared_storage": SharedStorage,
}


def make_kv_mode(server: ServerView) -> KvMode:
    return MODES[server.config.kv_connector](server)


__all__ = ["KvMode", "KvSource", "KvStore", "Plan", "Produce", "ServerView", "Staged",
           "make_kv_mode", "query_answer"]
