"""MooncakeConnector: a transfer id shared by both legs, found through the bootstrap server.

This server is also its own bootstrap server: ``GET /query`` (mooncake mode only) answers
vLLM's ``{"<dp_rank>": {"engine_id": ..., "worker_addr": {"0": {"0": "host:port"}}}}`` for
each of its ``data_parallel_size`` ranks, so the bootstrap port *is* the HTTP port here.

Prefill: ``do_remote_decode`` with a ``transfer_id`` — held under that id by the engine of
the request's DP rank (``X-data-parallel-rank``); vLLM logs "Missing transfer_id" and sends
nothing without one. Its answer carries no kv_transfer_params.

Decode: ``do_remote_prefill`` with ``remote_engine_id``, ``remote_bootstrap_addr`` and
``transfer_id`` (else ``invalid_params``): it asks ``remote_bootstrap_addr + "/query"`` for
the worker of that engine (none: ``engine_mismatch``), then waits there for the transfer
id's KV up to ``kv_wait_timeout_s``.
"""

from __future__ import annotations

from typing import Any

from emulator.connectors.base import (
    NO_PLAN,
    AwaitSource,
    Plan,
    Produce,
    ServerView,
    Staged,
    engine_id_of,
    http_base,
    wait_wall_s,
)
from emulator.kv import KvPuller, PullOutcome
from emulator.protocol import GenRequest

DECODE_FIELDS = ("remote_engine_id", "remote_bootstrap_addr", "transfer_id")


def query_answer(server: ServerView) -> dict[str, Any]:
    """What ``GET /query`` answers (vLLM's MooncakeBootstrapServer.query)."""
    worker = f"{server.config.side_channel_host}:{server.advertised_port}"
    return {
        str(rank): {"engine_id": engine_id_of(server, rank), "worker_addr": {"0": {"0": worker}}}
        for rank in range(server.config.data_parallel_size)
    }


class MooncakeSource:
    storage = False

    def __init__(self, puller: KvPuller, bootstrap: str, engine_id: str, key: str,
                 wait_s: float) -> None:
        self.puller = puller
        self.where = bootstrap.rstrip("/")
        self.engine_id = engine_id
        self.key = key
        self.wait_s = wait_s
        self._worker: AwaitSource | None = None

    async def fetch(self, prompt_hash: int) -> PullOutcome:
        try:
            ranks = await self.puller.get_json(self.where + "/query")
        except Exception as exc:  # any failure to reach or parse it is "unreachable"
            return PullOutcome("unreachable", detail=f"{self.where}/query: {exc!r}")
        addr = None
        if isinstance(ranks, dict):
            for entry in ranks.values():
                if isinstance(entry, dict) and entry.get("engine_id") == self.engine_id:
                    addr = entry.get("worker_addr", {}).get("0", {}).get("0")
        if not isinstance(addr, str) or ":" not in addr:
            return PullOutcome("engine_mismatch",
                               detail=f"{self.where}/query lists no engine {self.engine_id}")
        host, _, port = addr.rpartition(":")
        self._worker = AwaitSource(self.puller, http_base(host, port), self.key,
                                   self.engine_id, self.wait_s)
        self.where = self._worker.where
        return await self._worker.fetch(prompt_hash)

    def release(self) -> None:
        if self._worker is not None:
            self._worker.release()


class Mooncake:
    name = "mooncake"

    def __init__(self, server: ServerView) -> None:
        self.server = server

    def plan(self, req: GenRequest) -> Plan:
        params = req.kv_transfer_params
        if not params:
            return NO_PLAN
        transfer_id = params.get("transfer_id")
        if params.get("do_remote_decode"):
            if not isinstance(transfer_id, str) or not transfer_id:
                return NO_PLAN
            return Plan(produce=Produce(transfer_id, engine_id_of(self.server, req.dp_rank)))
        if params.get("do_remote_prefill"):
            puller = self.server.puller
            if puller is None or any(not params.get(k) for k in DECODE_FIELDS):
                return Plan(invalid="invalid_params")
            return Plan(consume=MooncakeSource(
                puller, str(params["remote_bootstrap_addr"]), str(params["remote_engine_id"]),
                str(transfer_id), wait_wall_s(self.server.config)))
        return NO_PLAN

    def response_params(self, staged: Staged) -> dict[str, Any] | None:
        return None
