"""The KV-transfer connector interface: how one engine's prefill/decode handshake works.

pdlb's proxy owns routing, accounting, transport and relaying; a connector owns only what
differs between KV-transfer mechanisms:

* ``prefill_body`` — the prefill leg's JSON body (usually: the client's body with
  ``max_tokens = 1``, no streaming, plus the connector's handshake fields);
* ``accept_prefill`` — read the prefill's answer and return what the decode leg needs
  (raise :class:`lb.errors.PrefillFailed` with a short ``reason`` to veto it: that reason
  becomes a metric label and the client gets a clean 502);
* ``decode_body`` — the decode leg's body: the client's original body plus the handshake.

Connectors are sequential here (the decode leg starts after the prefill answered), which is
what NixlConnector pull mode, LMCache and shared-storage need. Connectors are built at
start-up from ``[kv_transfer]``; options are checked there, never per request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from lb.pool import Backend
from lb.request import ProxyRequest

# Fields that make no sense (or are rejected by vLLM) on a one-token, non-streamed prefill.
_PREFILL_DROP = ("stream_options", "min_tokens", "min_completion_tokens", "stop",
                 "stop_token_ids", "logprobs", "top_logprobs", "echo", "n", "best_of")


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """What the prefill leg produced, as far as the decode leg and usage stitching care."""

    handoff: Mapping[str, Any] | None
    """The connector's handshake data for the decode leg (e.g. NIXL's kv_transfer_params)."""
    usage: Mapping[str, Any] | None
    """The prefill response's ``usage`` object, if any."""
    prompt_tokens: int | None
    cached_tokens: int | None
    """The prefill's prefix-cache hits: usage.prompt_tokens_details.cached_tokens, else the
    connector's own report (NIXL: remote_prefill_cached_tokens)."""


def one_token_prefill_body(request: ProxyRequest) -> dict[str, Any]:
    """The client's body made into a one-token, non-streamed prefill that cannot stop early."""
    body = {k: v for k, v in request.body.items() if k not in _PREFILL_DROP}
    body["max_tokens"] = 1
    if "max_completion_tokens" in request.body:
        body["max_completion_tokens"] = 1
    body["stream"] = False
    # An EOS or stop token as the single prefill token finishes the request "stopped" and
    # NixlConnector then returns no kv_transfer_params and frees the blocks.
    body["ignore_eos"] = True
    return body


def usage_of(
    response: Mapping[str, Any],
) -> tuple[Mapping[str, Any] | None, int | None, int | None]:
    """(usage, prompt_tokens, cached_tokens) from a completion/chat response body."""
    usage = response.get("usage")
    if not isinstance(usage, dict):
        return None, None, None
    prompt = usage.get("prompt_tokens")
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return (
        usage,
        prompt if isinstance(prompt, int) else None,
        cached if isinstance(cached, int) else None,
    )


class Connector(Protocol):
    name: str

    def prefill_body(self, request: ProxyRequest) -> dict[str, Any]: ...

    def accept_prefill(self, response: Mapping[str, Any], backend: Backend) -> PrefillResult: ...

    def decode_body(self, request: ProxyRequest, prefill: PrefillResult) -> dict[str, Any]: ...


class ConnectorOptionError(ValueError):
    """A bad ``[kv_transfer]`` option; the message names it."""
