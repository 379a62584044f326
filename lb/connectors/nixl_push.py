"""vLLM NixlPushConnector: both legs at once; the prefill engine writes the KV into the decode.

The decode engine allocates its blocks, registers them with the prefill engine over NIXL
and waits; the prefill engine writes the KV when it has both its finished request and that
registration. The decode therefore needs nothing from the prefill's answer, only the prefill
engine's coordinates, which come from configuration (vLLM's push proxy takes them as flags):

    [kv_transfer]
    connector = "nixl_push"
    side_channel_port = 5600     # default for every prefill (VLLM_NIXL_SIDE_CHANNEL_PORT)
    tp_size = 1                  # prefill tensor-parallel size (default 1)
    pp_size = 1                  # prefill pipeline-parallel size (default 1)

    [kv_transfer.backends."http://10.0.0.1:8100"]
    engine_id = "prefill-engine-001"   # required: the prefill's --kv-transfer-config engine_id
    kv_host = "10.0.0.1"               # optional: VLLM_NIXL_SIDE_CHANNEL_HOST; default: URL host

Prefill leg: one token, non-streamed, ``kv_transfer_params`` = NixlConnector's prefill
template + ``transfer_id``. Decode leg: the client's body + ``{"do_remote_decode": false,
"do_remote_prefill": true, remote_engine_id, remote_host, remote_port, tp_size, pp_size,
"remote_request_id": <the X-Request-Id of both legs>, transfer_id}`` (no remote_block_ids).
``transfer_id`` is ``xfer-<uuid>``, fresh for every dispatch, retries included, so a
retried pair can never be matched with the KV of an abandoned one.

Veto: a prefill answer without ``kv_transfer_params`` (the engine is no push producer, or
staged nothing) or naming another engine id than configured means the decode would wait
for a write that never comes: the pair is failed (and retried) at once.

Lease/cleanup: the prefill keeps the finished request's blocks for its lease
(``kv_lease_duration``) until the write completes; if pdlb cancels the decode (client gone,
prefill failed) vLLM aborts it and tells the prefill; if the decode failed before it
registered, the prefill's blocks wait for the lease to end — nothing in the protocol lets a
proxy release them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from lb.connectors.base import (
    BackendRef,
    ConnectorOptionError,
    Dispatch,
    HandshakeMode,
    PrefillResult,
    RequestView,
    new_transfer_id,
    one_token_prefill_body,
    prefill_result,
)
from lb.connectors.nixl import PREFILL_PARAMS
from lb.connectors.options import ConnectorOptions, check_port
from lb.errors import PrefillFailed


@dataclass(frozen=True, slots=True)
class PushPeer:
    """The prefill engine's coordinates, as the decode engine needs them."""

    engine_id: str
    host: str
    port: int
    tp_size: int
    pp_size: int


class NixlPushConnector:
    name = "nixl_push"
    mode = HandshakeMode.CONCURRENT

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = ConnectorOptions(
            self.name, options,
            keys={"side_channel_port": int, "tp_size": int, "pp_size": int},
            backend_keys={"engine_id": str, "kv_host": str, "side_channel_port": int,
                          "tp_size": int, "pp_size": int},
        )
        self._peers: dict[str, PushPeer] = {}

    # --------------------------------------------------------------- configuration
    def check_backends(self, prefill: Sequence[BackendRef], decode: Sequence[BackendRef]
                       ) -> None:
        self.options.check_urls(b.url for b in prefill)
        seen: dict[str, str] = {}
        for url in (b.url for b in prefill):
            peer = self._peer_of(url)
            if peer.engine_id in seen:
                raise ConnectorOptionError(
                    f"{self.options.where(url, 'engine_id')} = {peer.engine_id!r}: the same"
                    f" engine id as {seen[peer.engine_id]} (each prefill engine has its own)")
            seen[peer.engine_id] = url

    def _peer_of(self, url: str) -> PushPeer:
        peer = self._peers.get(url)
        if peer is not None:
            return peer
        o = self.options
        engine_id = o.backend(url).get("engine_id")
        if not engine_id:
            raise ConnectorOptionError(
                f"{o.where(url, 'engine_id')}: missing; nixl_push needs each prefill"
                " engine's id (the engine_id of its --kv-transfer-config): add"
                f' [kv_transfer.backends."{url}"] engine_id = "..."')
        host = o.backend(url).get("kv_host")
        if host is None:
            host = urlsplit(url).hostname or ""
        sizes = {}
        for key in ("tp_size", "pp_size"):
            sizes[key] = o.backend_value(url, key, 1)
            if sizes[key] < 1:
                raise ConnectorOptionError(f"{o.where(url, key)} = {sizes[key]}: must be >= 1")
        port = check_port(o.where(url, "side_channel_port"),
                          o.backend_value(url, "side_channel_port", 5600))
        peer = PushPeer(engine_id=engine_id, host=host, port=port, tp_size=sizes["tp_size"],
                        pp_size=sizes["pp_size"])
        self._peers[url] = peer
        return peer

    # --------------------------------------------------------------- the handshake
    def new_dispatch(self, request: RequestView, prefill: BackendRef, decode: BackendRef | None
                     ) -> Dispatch:
        try:
            peer = self._peer_of(prefill.url)
        except ConnectorOptionError as exc:  # a backend added by a reload, unconfigured
            raise PrefillFailed(f"nixl_push: {exc}", reason="backend_not_configured") from None
        return Dispatch(request.request_id, prefill, decode,
                        {"transfer_id": new_transfer_id(), "peer": peer})

    def prefill_body(self, request: RequestView, dispatch: Dispatch) -> dict[str, Any]:
        body = one_token_prefill_body(request)
        body["kv_transfer_params"] = {**PREFILL_PARAMS,
                                      "transfer_id": dispatch.state["transfer_id"]}
        return body

    def accept_prefill(self, response: Mapping[str, Any], dispatch: Dispatch) -> PrefillResult:
        url = dispatch.prefill.url
        params = response.get("kv_transfer_params")
        if not isinstance(params, dict) or not params:
            raise PrefillFailed(
                f"prefill {url} returned no kv_transfer_params: it staged no KV to push (is it"
                " a NixlPushConnector kv_producer?); the decode would wait for nothing",
                reason="missing_kv_transfer_params")
        peer: PushPeer = dispatch.state["peer"]
        engine = params.get("remote_engine_id")
        if engine is not None and engine != peer.engine_id:
            raise PrefillFailed(
                f"prefill {url} is engine {engine!r} but {self.options.where(url, 'engine_id')}"
                f" = {peer.engine_id!r}: the decode registers with the wrong engine",
                reason="engine_id_mismatch")
        result = prefill_result(response)
        cached = params.get("remote_prefill_cached_tokens")
        if result.cached_tokens is None and isinstance(cached, int):
            result = PrefillResult(handoff=None, usage=result.usage,
                                   prompt_tokens=result.prompt_tokens, cached_tokens=cached)
        return result

    def decode_body(
        self, request: RequestView, dispatch: Dispatch, prefill: PrefillResult | None
    ) -> dict[str, Any]:
        peer: PushPeer = dispatch.state["peer"]
        body = dict(request.body)
        body["kv_transfer_params"] = {
            "do_remote_decode": False,
            "do_remote_prefill": True,
            "remote_engine_id": peer.engine_id,
            "remote_host": peer.host,
            "remote_port": peer.port,
            "tp_size": peer.tp_size,
            "pp_size": peer.pp_size,
            "remote_request_id": dispatch.request_id,
            "transfer_id": dispatch.state["transfer_id"],
        }
        return body
