"""NixlConnector, pull mode (vLLM 0.32): the prefill holds, the decode pulls by request id.

``kv_transfer_params.do_remote_decode`` on a request: hold its KV when it finishes, keyed by
the engine's internal request id, and answer vLLM 0.32's params. ``do_remote_prefill`` with
``remote_engine_id``, ``remote_request_id``, ``remote_host``, ``remote_port`` and non-empty
``remote_block_ids``: pull from ``remote_host:remote_port`` (``/_emulator/kv/pull``);
anything less is ``invalid_params``. See docs/emulator.md for the whole story.
"""

from __future__ import annotations

from typing import Any

from emulator.connectors.base import NO_PLAN, Plan, Produce, ServerView, Staged, engine_id_of
from emulator.kv import KvPuller, PullOutcome, RemoteKv, parse_remote_params
from emulator.protocol import GenRequest


class NixlSource:
    storage = False

    def __init__(self, remote: RemoteKv, puller: KvPuller) -> None:
        self.remote = remote
        self.puller = puller
        self.where = remote.base_url

    async def fetch(self, prompt_hash: int) -> PullOutcome:
        return await self.puller.pull(self.remote, prompt_hash)

    def release(self) -> None:
        self.puller.release(self.remote)  # vLLM tells the prefill to free its blocks


class NixlPull:
    name = "nixl"

    def __init__(self, server: ServerView) -> None:
        self.server = server

    def plan(self, req: GenRequest) -> Plan:
        params = req.kv_transfer_params
        if not params:
            return NO_PLAN
        if params.get("do_remote_decode"):
            return Plan(produce=Produce(req.engine_request_id,
                                        engine_id_of(self.server, req.dp_rank)))
        if params.get("do_remote_prefill"):
            remote = parse_remote_params(params)
            puller = self.server.puller
            if remote is None or puller is None:
                return Plan(invalid="invalid_params")
            return Plan(consume=NixlSource(remote, puller))
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
            "dcp_size": 1,
            "pp_size": 1,
            "remote_num_tokens": staged.num_tokens,
            "remote_blocks_expiry_time": None,
            "transfer_mode": "pull",
            "remote_prefill_cached_tokens": staged.cached_tokens,
        }
