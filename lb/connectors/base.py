"""The KV-transfer connector interface: how one engine's prefill/decode handshake works.

pdlb's proxy owns routing, accounting, transport and relaying; a connector owns only what
differs between KV-transfer mechanisms:

* ``new_dispatch`` — per attempt: the request id both legs carry and any per-transfer
  values (transfer ids, bootstrap rooms);
* ``prefill_body`` — the prefill leg's JSON body (usually: the client's body with
  ``max_tokens = 1``, no streaming, plus the connector's handshake fields);
* ``accept_prefill`` — read the prefill's answer and return what the decode leg needs
  (raise :class:`lb.errors.PrefillFailed` with a short ``reason`` to veto it: that reason
  becomes a metric label and the client gets a clean 502);
* ``decode_body`` — the decode leg's body: the client's original body plus the handshake.

Headers: a dispatch may carry extra headers per leg (``Dispatch.prefill_headers`` /
``decode_headers``, e.g. Mooncake's ``X-data-parallel-rank`` on the prefill leg); they are
added to the headers pdlb sends anyway (Content-Type, X-Request-Id = ``Dispatch.request_id``,
Authorization, forwarded trace and DP-rank headers) and win over a client's header of the
same name.

Sequential connectors (NixlConnector pull mode, LMCache, shared storage, P2P NCCL) start the
decode leg after the prefill answered; concurrent ones (NixlPush, Mooncake, SGLang) send both
legs at once and the proxy cancels the other leg when one fails. Connectors are built at
start-up from ``[kv_transfer]``; options are checked there, never per request. Two optional
hooks, each its own Protocol: :class:`ConnectorBackendCheck` (static, at build time, given
the pools' URLs: every backend has the options it needs) and :class:`ConnectorStartup`
(network checks once the HTTP session exists: bootstrap servers reachable, discovery).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from lb.backends.pool import Backend
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


UNKNOWN_PREFILL = PrefillResult(handoff=None, usage=None, prompt_tokens=None, cached_tokens=None)


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


@dataclass(frozen=True, slots=True)
class Dispatch:
    """One attempt at a request: the backends chosen and the connector's per-attempt values.

    A connector makes a fresh Dispatch for every attempt (retries included), so values that
    must be unique per transfer (NixlPush/Mooncake ``transfer_id``, SGLang ``bootstrap_room``)
    never repeat.
    """

    request_id: str
    """The X-Request-Id both legs carry (a connector may encode addresses in it)."""
    prefill: Backend
    decode: Backend | None
    """Known up front for concurrent and ``decode_first`` connectors; else None."""
    state: Mapping[str, Any] = field(default_factory=dict)
    prefill_headers: Mapping[str, str] = field(default_factory=dict)
    """Extra headers of the prefill leg (they override same-named client headers)."""
    decode_headers: Mapping[str, str] = field(default_factory=dict)
    """Extra headers of the decode leg."""


class Connector(Protocol):
    """One KV-transfer handshake. Implement the four methods and the three flags."""

    name: str
    concurrent: bool
    """True: prefill and decode legs are sent at the same time (the decode waits for the KV
    itself); False: the decode leg starts after the prefill answered."""
    decode_first: bool
    """The dispatch must name the decode backend before the prefill leg (always true for
    concurrent connectors)."""
    reusable_handoff: bool
    """A decode leg that could not even connect may be retried on another decode backend
    with the same prefill handoff (NIXL pull: the prefill still holds the blocks)."""

    def new_dispatch(
        self, request: ProxyRequest, prefill: Backend, decode: Backend | None
    ) -> Dispatch: ...

    def prefill_body(self, request: ProxyRequest, dispatch: Dispatch) -> dict[str, Any]: ...

    def accept_prefill(self, response: Mapping[str, Any], dispatch: Dispatch) -> PrefillResult:
        """Read the prefill's answer; raise PrefillFailed(reason=...) to veto it."""
        ...

    def decode_body(
        self, request: ProxyRequest, dispatch: Dispatch, prefill: PrefillResult | None
    ) -> dict[str, Any]:
        """The decode leg's body; ``prefill`` is None for concurrent connectors."""
        ...


@runtime_checkable
class ConnectorBackendCheck(Protocol):
    """Optional: a static check of the pools, run when the connector is built (no network).
    Raise ConnectorOptionError naming the backend and the key it lacks."""

    def check_backends(self, prefill: Sequence[str], decode: Sequence[str]) -> None: ...


@runtime_checkable
class ConnectorStartup(Protocol):
    """Optional: checks that need the network, run once at start-up (e.g. a bootstrap
    server's /query). Raise lb.errors.ConfigError with a message naming the backend."""

    async def start(self, prefill: Sequence[Backend], decode: Sequence[Backend],
                    get_json: Callable[[str], Awaitable[Any]]) -> None: ...


def plain_dispatch(request: ProxyRequest, prefill: Backend, decode: Backend | None) -> Dispatch:
    return Dispatch(request_id=request.request_id, prefill=prefill, decode=decode)


def new_transfer_id() -> str:
    """A fresh ``xfer-<32 hex>`` id (NixlPush, Mooncake): one per dispatch, never reused."""
    return f"xfer-{uuid.uuid4().hex}"


def prefill_result(response: Mapping[str, Any], handoff: Mapping[str, Any] | None = None
                   ) -> PrefillResult:
    """The usage figures of a prefill answer, with an optional handoff."""
    usage, prompt_tokens, cached = usage_of(response)
    return PrefillResult(handoff=handoff, usage=usage, prompt_tokens=prompt_tokens,
                         cached_tokens=cached)


class ConnectorOptionError(ValueError):
    """A bad ``[kv_transfer]`` option; the message names it."""
