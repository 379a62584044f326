"""``tagged``: a connector for engines that share KV out of band and want a tag on both legs.

The prefill engine stores the prompt's KV where the decode engine finds it (a shared store,
as vLLM's ExampleConnector or LMCache do); the proxy only orders the legs — prefill with one
token, then decode with the client's body — and sends ``X-Tag: <tag>`` on both, so the
engines (or a gateway in front of them) can tell pdlb's disaggregated traffic apart.

Options (``[kv_transfer]``, next to ``connector = "tagged"``):

* ``tag`` (string, default ``"pd"``): the header's value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lb.connectors.base import (
    BackendRef,
    Dispatch,
    HandshakeMode,
    PrefillResult,
    RequestView,
    one_token_prefill_body,
    prefill_result,
)
from lb.connectors.options import ConnectorOptions


class Tagged:
    name = "tagged"
    mode = HandshakeMode.SEQUENTIAL_REUSABLE  # the KV stays in the store: a retry may reuse it

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.tag: str = ConnectorOptions(self.name, options, keys={"tag": str}).get("tag", "pd")

    def new_dispatch(self, request: RequestView, prefill: BackendRef,
                     decode: BackendRef | None) -> Dispatch:
        tag = {"X-Tag": self.tag}
        return Dispatch(request.request_id, prefill, decode, prefill_headers=tag,
                        decode_headers=tag)

    def prefill_body(self, request: RequestView, dispatch: Dispatch) -> dict[str, Any]:
        return one_token_prefill_body(request)

    def accept_prefill(self, response: Mapping[str, Any], dispatch: Dispatch) -> PrefillResult:
        return prefill_result(response)

    def decode_body(self, request: RequestView, dispatch: Dispatch,
                    prefill: PrefillResult | None) -> dict[str, Any]:
        return dict(request.body)
