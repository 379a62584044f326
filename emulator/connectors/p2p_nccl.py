"""P2pNcclConnector: the prefill and decode addresses are in the X-Request-Id.

Both legs carry ``___prefill_addr_{P}___decode_addr_{D}_{uuid}``; this server's "ZMQ
address" is ``side_channel_host:<its HTTP port>`` (loopback names are all one).

Prefill role: a request whose id has the pattern is held under its key when it finishes
(real vLLM sends it to D over NCCL; here D fetches it). Decode role: D must be this server
(else the KV went to another decode: ``wrong_decode``); it takes the key's KV from P
(``/_emulator/kv/await``, waiting up to ``kv_wait_timeout_s``).

The key is the request id as the proxy sent it — what vLLM used before #27987, and what
``VLLM_DISABLE_REQUEST_ID_RANDOMIZATION=1`` restores. With ``request_id_randomization`` it
is the engine's internal id, randomly suffixed per engine as vLLM does since #27987: P and D
then never match and the decode times out (the fragility, reproduced).
"""

from __future__ import annotations

import re
from typing import Any

from emulator.connectors.base import (
    LOOPBACK,
    NO_PLAN,
    AwaitSource,
    FixedOutcome,
    Plan,
    Produce,
    ServerView,
    Staged,
    engine_id_of,
    http_base,
    wait_wall_s,
)
from emulator.kv import PullOutcome
from emulator.protocol import GenRequest

# vLLM's own patterns (P2pNcclConnector.parse_request_id).
PREFILL_ADDR = re.compile(r"___prefill_addr_(.*):(\d+)___")
DECODE_ADDR = re.compile(r"___decode_addr_(.*):(\d+)")


def _same_host(a: str, b: str) -> bool:
    a, b = a.strip("[]"), b.strip("[]")
    return a == b or (a in LOOPBACK and b in LOOPBACK)


class P2pNccl:
    name = "p2p_nccl"

    def __init__(self, server: ServerView) -> None:
        self.server = server

    def _key(self, req: GenRequest) -> str:
        if self.server.config.request_id_randomization:
            return req.engine_request_id
        return req.header_request_id or ""

    def plan(self, req: GenRequest) -> Plan:
        rid = req.header_request_id or ""
        prefill = PREFILL_ADDR.search(rid)
        decode = DECODE_ADDR.search(rid)
        if prefill is None or decode is None:
            return NO_PLAN
        role = self.server.config.role
        if role == "prefill":
            return Plan(produce=Produce(self._key(req), engine_id_of(self.server, req.dp_rank)))
        if role != "decode":
            return NO_PLAN
        puller = self.server.puller
        if puller is None:
            return Plan(invalid="invalid_params")
        d_host, d_port = decode.group(1), int(decode.group(2))
        source = http_base(prefill.group(1), prefill.group(2))
        if not (d_port == self.server.advertised_port
                and _same_host(d_host, self.server.config.side_channel_host)):
            return Plan(consume=FixedOutcome(
                PullOutcome("wrong_decode", detail=f"the id names decode {d_host}:{d_port}"),
                source))
        return Plan(consume=AwaitSource(puller, source, self._key(req), None,
                                        wait_wall_s(self.server.config)))

    def response_params(self, staged: Staged) -> dict[str, Any] | None:
        return None
