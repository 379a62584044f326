"""vLLM P2pNcclConnector: the KV addresses travel inside the request id.

Both legs carry the same ``X-Request-Id``::

    ___prefill_addr_{prefill ZMQ host:port}___decode_addr_{decode ZMQ host:port}_{uuid hex}

The prefill engine parses the decode's address out of it (``___decode_addr_(.*):(\\d+)``)
and sends the KV there over NCCL (``send_type`` PUT / PUT_ASYNC; in GET mode the decode
parses ``___prefill_addr_(.*):(\\d+)___`` and fetches instead). So the decode backend must
be chosen before the prefill leg (mode DECODE_FIRST), and a decode retry needs a new prefill
(the KV went to the first decode). The proxy sends the prefill (one token, non-streamed),
waits, then the decode with the client's original body — no handshake fields.

vLLM's own proxy learns each instance's ZMQ address from registrations the instances send
it over ZMQ (msgpack ``{"type": "P"|"D", "http_address", "zmq_address"}`` every few
seconds). pdlb runs no ZMQ listener; the addresses are configuration, one per backend of
both pools (``kv_connector_extra_config``'s ``kv_ip:kv_port`` of that instance)::

    [kv_transfer]
    connector = "p2p_nccl"

    [kv_transfer.backends."http://10.0.0.1:8100"]
    zmq_address = "10.0.0.1:21001"
    [kv_transfer.backends."http://10.0.0.2:8200"]
    zmq_address = "10.0.0.2:22001"

Fragile on recent vLLM: since #27987 vLLM appends a random suffix per engine to the
internal request id, and P2pNcclConnector keys the tensors it sends by that id, so prefill
and decode never agree on a key and the decode waits or recomputes. Run both instances with
``VLLM_DISABLE_REQUEST_ID_RANDOMIZATION=1``. The instances' registration pings to a proxy
address (``proxy_ip``/``proxy_port``) go unanswered with pdlb; they are informational.

Lease/cleanup: the prefill's send buffer holds the tensors until the decode took them (or
its memory pool evicts them); a decode pdlb cancels before it starts never takes them.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from lb.connectors.base import (
    BackendRef,
    ConnectorOptionError,
    Dispatch,
    HandshakeMode,
    PrefillResult,
    RequestView,
    prefill_result,
)
from lb.connectors.options import ConnectorOptions, check_host_port
from lb.connectors.plain import plain_decode_body, plain_prefill_body
from lb.errors import PrefillFailed


def p2p_request_id(prefill_zmq: str, decode_zmq: str) -> str:
    return f"___prefill_addr_{prefill_zmq}___decode_addr_{decode_zmq}_{uuid.uuid4().hex}"


class P2pNcclConnector:
    name = "p2p_nccl"
    mode = HandshakeMode.DECODE_FIRST

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = ConnectorOptions(self.name, options, keys={},
                                        backend_keys={"zmq_address": str})

    def check_backends(self, prefill: Sequence[BackendRef], decode: Sequence[BackendRef]
                       ) -> None:
        urls = [b.url for b in (*prefill, *decode)]
        self.options.check_urls(urls)
        missing = [u for u in urls if "zmq_address" not in self.options.backend(u)]
        if missing:
            raise ConnectorOptionError(
                f"{self.options.where(missing[0], 'zmq_address')}: missing; p2p_nccl needs"
                " the ZMQ address (kv_ip:kv_port) of every prefill and decode backend; none"
                f" for: {', '.join(missing)}")
        for url in urls:
            self.zmq_address(url)

    def zmq_address(self, url: str) -> str:
        where = self.options.where(url, "zmq_address")
        value = self.options.backend(url).get("zmq_address")
        if value is None:
            raise ConnectorOptionError(f"{where}: missing")
        return check_host_port(where, value)

    def new_dispatch(self, request: RequestView, prefill: BackendRef, decode: BackendRef | None
                     ) -> Dispatch:
        if decode is None:
            raise RuntimeError("p2p_nccl is DECODE_FIRST: the proxy must name the decode")
        try:
            request_id = p2p_request_id(self.zmq_address(prefill.url),
                                        self.zmq_address(decode.url))
        except ConnectorOptionError as exc:  # a backend added by a reload, unconfigured
            raise PrefillFailed(f"p2p_nccl: {exc}", reason="backend_not_configured") from None
        return Dispatch(request_id, prefill, decode)

    def prefill_body(self, request: RequestView, dispatch: Dispatch) -> dict[str, Any]:
        return plain_prefill_body(request)

    def accept_prefill(self, response: Mapping[str, Any], dispatch: Dispatch) -> PrefillResult:
        return prefill_result(response)

    def decode_body(
        self, request: RequestView, dispatch: Dispatch, prefill: PrefillResult | None
    ) -> dict[str, Any]:
        return plain_decode_body(request)
