"""NixlPushConnector: the decode registers, the prefill writes the KV when it is done.

Prefill: ``do_remote_decode`` with a ``transfer_id`` — the finished request's KV is held
under that transfer id (no transfer id: vLLM would have nothing to match a registration
with, so nothing is staged). Its answer carries the push connector's params
(``transfer_mode = "push"``).

Decode: ``do_remote_prefill`` with ``remote_engine_id``, ``remote_host``, ``remote_port``
and ``transfer_id`` (no block ids) — it waits at the prefill's side channel
(``remote_host:remote_port``, this emulator's HTTP port unless ``side_channel_port``) for
the KV of that transfer id, up to ``kv_wait_timeout_s`` (vLLM: the registration watchdog),
and the engine id must be the one that holds it. Missing fields: ``invalid_params``.
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
from emulator.protocol import GenRequest

DECODE_FIELDS = ("remote_engine_id", "remote_host", "remote_port", "transfer_id")


class NixlPush:
    name = "nixl_push"

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
            if puller is None or any(params.get(k) in (None, "") for k in DECODE_FIELDS):
                return Plan(invalid="invalid_params")
            try:
                port = int(params["remote_port"])
            except (TypeError, ValueError):
                return Plan(invalid="invalid_params")
            return Plan(consume=AwaitSource(
                puller, http_base(str(params["remote_host"]), port), str(transfer_id),
                str(params["remote_engine_id"]), wait_wall_s(self.server.config)))
        return NO_PLAN

    def response_params(self, staged: Staged) -> dict[str, Any] | None:
        server = self.server
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [staged.block_ids],
            "remote_engine_id": staged.engine_id,
            "remote_request_id": staged.request_id,
            "remote_host": server.config.side_channel_host,
            "remote_port": server.advertised_port,
            "tp_size": 1,
            "pp_size": 1,
            "remote_num_tokens": staged.num_tokens,
            "transfer_mode": "push",
        }
