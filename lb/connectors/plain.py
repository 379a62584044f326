"""Connectors with no handshake: vLLM's ExampleConnector (shared storage) and LMCache.

The prefill engine writes the prompt's KV to a store both engines reach (a shared folder for
ExampleConnector, LMCache's local/remote backends); the decode engine looks the same prompt
up there and loads what it finds. Nothing travels through the proxy, so the proxy's whole
job is the order: prefill with ``max_tokens = 1`` (non-streamed, no stop criteria), wait for
it, then decode with the client's original body.

Both legs must render *identical* tokens — the store is keyed by a hash of the prompt's
token ids — so the prefill body is the client's body with only the generation knobs
changed (same messages, template flags, ``add_special_tokens``...). A decode that finds
nothing recomputes the prompt silently; vLLM counts it under
``vllm:prompt_tokens_by_source{source="local_compute"}`` rather than ``external_kv_transfer``.

Lease/cleanup: nothing is held in GPU memory for the decode; what the store keeps is the
store's business (ExampleConnector never deletes its files; LMCache evicts by its own
policy). A decode leg may be retried on another decode backend with the same prefill
(mode SEQUENTIAL_REUSABLE): the KV is in the shared store, not consumed by the first reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lb.connectors.base import (
    Dispatch,
    HandshakeMode,
    PrefillResult,
    RequestView,
    one_token_prefill_body,
    plain_dispatch,
    prefill_result,
)
from lb.connectors.options import ConnectorOptions


def plain_prefill_body(request: RequestView) -> dict[str, Any]:
    """One-token prefill with no handshake fields (the KV travels out of band)."""
    body = one_token_prefill_body(request)
    body.pop("kv_transfer_params", None)
    return body


def plain_decode_body(request: RequestView) -> dict[str, Any]:
    """The client's body, minus any handshake fields a client may have sent."""
    body = dict(request.body)
    body.pop("kv_transfer_params", None)
    return body


class SharedStorageConnector:
    """vLLM's ExampleConnector (``kv_connector = "ExampleConnector"``, shared_storage_path)."""

    name = "shared_storage"
    mode = HandshakeMode.SEQUENTIAL_REUSABLE
    new_dispatch = staticmethod(plain_dispatch)

    def __init__(self, options: Mapping[str, Any]) -> None:
        ConnectorOptions(self.name, options, keys={})

    def prefill_body(self, request: RequestView, dispatch: Dispatch) -> dict[str, Any]:
        return plain_prefill_body(request)

    def accept_prefill(self, response: Mapping[str, Any], dispatch: Dispatch) -> PrefillResult:
        return prefill_result(response)

    def decode_body(
        self, request: RequestView, dispatch: Dispatch, prefill: PrefillResult | None
    ) -> dict[str, Any]:
        return plain_decode_body(request)


class LMCacheConnector(SharedStorageConnector):
    """LMCache as vLLM's disaggregated example runs it (LMCacheConnectorV1 on both engines).

    LMCache's own newer proxy (tokenize first, first token returned by the prefill, ZMQ
    notifications) is a different protocol and not this connector.
    """

    name = "lmcache"
