"""SGLang PD: bootstrap_host / bootstrap_port / bootstrap_room in the same body on both legs.

This server speaks vLLM's HTTP surface in every mode; in sglang mode it also plays the
SGLang roles: a prefill-role server is its own bootstrap server (the bootstrap port is its
HTTP port; ``GET /health`` answers 200) and computes only the first token whatever
``max_tokens`` says, holding the room's KV; a decode-role server waits at
``bootstrap_host:bootstrap_port`` for the room's KV (up to ``kv_wait_timeout_s``). A decode
request without host and port is ``invalid_params``.
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


class SGLang:
    name = "sglang"

    def __init__(self, server: ServerView) -> None:
        self.server = server

    def plan(self, req: GenRequest) -> Plan:
        boot = req.bootstrap or {}
        room = boot.get("bootstrap_room")
        if room is None:
            return NO_PLAN
        role = self.server.config.role
        if role == "prefill":
            req.max_tokens = 1  # SGLang's prefill server returns after the first token
            return Plan(produce=Produce(str(room), engine_id_of(self.server, req.dp_rank)))
        if role != "decode":
            return NO_PLAN
        host, port = boot.get("bootstrap_host"), boot.get("bootstrap_port")
        puller = self.server.puller
        if puller is None or not host or not isinstance(port, int) or isinstance(port, bool):
            return Plan(invalid="invalid_params")
        return Plan(consume=AwaitSource(puller, http_base(str(host), port), str(room), None,
                                        wait_wall_s(self.server.config)))

    def response_params(self, staged: Staged) -> dict[str, Any] | None:
        return None
