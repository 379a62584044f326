"""vLLM NixlConnector, pull mode: prefill first, then decode with the params it returned.

Prefill leg: one token, non-streamed, with ``kv_transfer_params = {"do_remote_decode": true,
...}``. Its answer carries ``kv_transfer_params`` (remote_engine_id, remote_block_ids,
remote_request_id, remote_host, remote_port, ...) which the decode leg sends back verbatim so
the decode engine pulls the KV blocks from the prefill engine over NIXL.

An answer without params (the single token was EOS, the prefill is not a kv_producer, ...)
is a failed prefill: decode would silently recompute the whole prompt.

``remote_host``: vLLM advertises VLLM_NIXL_SIDE_CHANNEL_HOST, "localhost" by default. When
the prefill lives on another host than its advertised loopback name suggests, the decode
would dial itself; with ``rewrite_remote_host = "auto"`` (default) pdlb replaces a loopback or
wildcard remote_host with the host in the prefill backend's URL when that URL is not loopback.
``"always"`` always uses the URL's host; ``"never"`` leaves the params untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lb.connectors.base import (
    BackendRef,
    ConnectorOptionError,
    Dispatch,
    HandshakeMode,
    PrefillResult,
    RequestView,
    is_loopback_host,
    one_token_prefill_body,
    plain_dispatch,
    usage_of,
)
from lb.errors import PrefillFailed
from policies.options import Options

PREFILL_PARAMS: Mapping[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}

REQUIRED_FOR_DECODE = ("remote_engine_id", "remote_host", "remote_port")


class NixlConnector:
    name = "nixl"
    mode = HandshakeMode.SEQUENTIAL_REUSABLE
    new_dispatch = staticmethod(plain_dispatch)

    def __init__(self, options: Mapping[str, Any]) -> None:
        table = Options(options, "kv_transfer", owner=f"connector {self.name!r}",
                        error=ConnectorOptionError)
        self.rewrite_mode = table.choice("rewrite_remote_host", ("auto", "always", "never"),
                                         "auto")
        table.done()

    def prefill_body(self, request: RequestView, dispatch: Dispatch) -> dict[str, Any]:
        body = one_token_prefill_body(request)
        body["kv_transfer_params"] = dict(PREFILL_PARAMS)
        return body

    def accept_prefill(self, response: Mapping[str, Any], dispatch: Dispatch) -> PrefillResult:
        backend = dispatch.prefill
        params = response.get("kv_transfer_params")
        if not isinstance(params, dict) or not params:
            raise PrefillFailed(
                f"prefill {backend.url} returned no kv_transfer_params (is it a NIXL"
                " kv_producer? did its single token hit EOS or a stop string?)",
                reason="missing_kv_transfer_params",
            )
        missing = [k for k in REQUIRED_FOR_DECODE if params.get(k) is None]
        if missing:
            raise PrefillFailed(
                f"prefill {backend.url} returned kv_transfer_params without {', '.join(missing)}",
                reason="incomplete_kv_transfer_params",
            )
        params = self._rewrite_host(params, backend)
        usage, prompt_tokens, cached = usage_of(response)
        if cached is None:
            remote_cached = params.get("remote_prefill_cached_tokens")
            if isinstance(remote_cached, int):
                cached = remote_cached
        return PrefillResult(handoff=params, usage=usage, prompt_tokens=prompt_tokens,
                             cached_tokens=cached)

    def _rewrite_host(self, params: dict[str, Any], backend: BackendRef) -> dict[str, Any]:
        if self.rewrite_mode == "never":
            return params
        advertised = str(params.get("remote_host") or "")
        if self.rewrite_mode == "always" or (
            is_loopback_host(advertised) and not backend.is_loopback
        ):
            return {**params, "remote_host": backend.host}
        return params

    def decode_body(
        self, request: RequestView, dispatch: Dispatch, prefill: PrefillResult | None
    ) -> dict[str, Any]:
        body = dict(request.body)
        body["kv_transfer_params"] = dict(prefill.handoff or {}) if prefill else {}
        return body
