"""The KV-transfer connector interface: how one engine's prefill/decode handshake works.

pdlb's proxy owns routing, accounting, transport and relaying; a connector owns only what
differs between KV-transfer mechanisms — everything a connector author needs is this file:

* :attr:`Connector.mode` — a :class:`HandshakeMode`: the order of the two legs and whether
  a prefill's handoff survives a decode retry;
* ``new_dispatch`` — per attempt: the request id both legs carry and any per-transfer
  values (transfer ids, bootstrap rooms);
* ``prefill_body`` — the prefill leg's JSON body (usually: the client's body with
  ``max_tokens = 1``, no streaming, plus the connector's handshake fields);
* ``accept_prefill`` — read the prefill's answer and return what the decode leg needs
  (raise :class:`lb.errors.PrefillFailed` with a short ``reason`` to veto it: that reason
  becomes a metric label and the client gets a clean 502);
* ``decode_body`` — the decode leg's body: the client's original body plus the handshake.

A connector sees views, never pdlb's own objects: a :class:`RequestView` (the client's body,
ids, endpoint) and :class:`BackendRef` (a backend's URL, host, port), both frozen.

Headers: a dispatch may carry extra headers per leg (``Dispatch.prefill_headers`` /
``decode_headers``, e.g. Mooncake's ``X-data-parallel-rank`` on the prefill leg); they are
added to the headers pdlb sends anyway (Content-Type, X-Request-Id = ``Dispatch.request_id``,
Authorization, forwarded trace and DP-rank headers) and win over a client's header of the
same name.

Connectors are built at start-up from ``[kv_transfer]``; options are checked there, never
per request (:class:`lb.connectors.options.ConnectorOptions`). Two optional hooks, each its
own Protocol: :class:`ConnectorBackendCheck` (static, at build time, given the pools'
backends: every backend has the options it needs) and :class:`ConnectorStartup` (network
checks once the HTTP session exists: bootstrap servers reachable, discovery).
:mod:`lb.connectors.testing` builds a connector by name and runs its handshake for a sample
request, for plugin authors' tests; ``examples/pdlb-connector-example`` is a complete,
installable plugin, and docs/connectors.md the guide.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

from policies.options import OptionError

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "::", ""})
"""Host names that mean "this machine" (or any of its addresses) to whoever reads them."""


def is_loopback_host(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


class HandshakeMode(enum.Enum):
    """The order of a connector's two legs, and what a decode retry may reuse.

    Four modes, because the three questions are not independent: a connector that sends
    both legs at once must know the decode first, and a handoff made for one named decode
    cannot be reused with another.
    """

    SEQUENTIAL = "sequential"
    """Prefill, then decode (chosen after the prefill answered) with what the prefill
    returned. The handoff is single-use: a decode retry redoes the prefill first."""
    SEQUENTIAL_REUSABLE = "sequential_reusable"
    """As SEQUENTIAL, but a decode that could not even connect is retried on another decode
    backend with the same prefill result (NIXL pull: the prefill holds the blocks until
    they are pulled; shared storage: the KV stays in the store)."""
    DECODE_FIRST = "decode_first"
    """The decode backend is chosen before the prefill leg and named in the dispatch
    (P2P NCCL's request id carries both addresses); prefill, then decode. A decode retry
    picks a new decode and so redoes the prefill."""
    CONCURRENT = "concurrent"
    """Both backends chosen first, both legs sent at once; the decode engine waits for the
    KV itself (NixlPush, Mooncake, SGLang). A leg that fails cancels the other and the pair
    is redone with a fresh dispatch; ``decode_body`` gets ``prefill=None``."""


@dataclass(frozen=True, slots=True)
class BackendRef:
    """One backend, as a connector sees it."""

    url: str
    """Its base URL exactly as configured in ``[pools.*]`` (no trailing slash)."""
    host: str
    """The URL's host name or address (IPv6 without brackets)."""
    port: int
    """The URL's port (80/443 when the URL gives none)."""

    @classmethod
    def of(cls, url: str) -> BackendRef:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(url=url.rstrip("/"), host=parts.hostname or "", port=port)

    @property
    def is_loopback(self) -> bool:
        """Whether the URL names this machine (localhost, 127.x, ::1, a wildcard)."""
        return is_loopback_host(self.host)


@dataclass(frozen=True, slots=True)
class RequestView:
    """The client's request, as a connector sees it. ``body`` is the client's JSON: read it,
    copy it (``dict(request.body)``), never modify it."""

    body: Mapping[str, Any]
    request_id: str
    """The client's X-Request-Id, or the one pdlb generated."""
    endpoint: Literal["completions", "chat"]
    path: str
    """The path both legs are posted to (``/v1/completions``, ``/v1/chat/completions``)."""
    stream: bool
    """Whether the client asked for a streamed answer (the decode leg streams if so)."""


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


def one_token_prefill_body(request: RequestView) -> dict[str, Any]:
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
    prefill: BackendRef
    decode: BackendRef | None
    """Known up front in the DECODE_FIRST and CONCURRENT modes; else None."""
    state: Mapping[str, Any] = field(default_factory=dict)
    """The connector's own per-attempt values, for its prefill_body/decode_body."""
    prefill_headers: Mapping[str, str] = field(default_factory=dict)
    """Extra headers of the prefill leg (they override same-named client headers)."""
    decode_headers: Mapping[str, str] = field(default_factory=dict)
    """Extra headers of the decode leg."""


class Connector(Protocol):
    """One KV-transfer handshake: a name, a mode and four methods."""

    name: str
    mode: HandshakeMode

    def new_dispatch(
        self, request: RequestView, prefill: BackendRef, decode: BackendRef | None
    ) -> Dispatch:
        """A fresh attempt; ``decode`` is None unless the mode is DECODE_FIRST or CONCURRENT.
        Raise PrefillFailed(reason=...) when this prefill cannot be used (not configured)."""
        ...

    def prefill_body(self, request: RequestView, dispatch: Dispatch) -> dict[str, Any]: ...

    def accept_prefill(self, response: Mapping[str, Any], dispatch: Dispatch) -> PrefillResult:
        """Read the prefill's answer; raise PrefillFailed(reason=...) to veto it."""
        ...

    def decode_body(
        self, request: RequestView, dispatch: Dispatch, prefill: PrefillResult | None
    ) -> dict[str, Any]:
        """The decode leg's body; ``prefill`` is None in the CONCURRENT mode."""
        ...


@runtime_checkable
class ConnectorBackendCheck(Protocol):
    """Optional: a static check of the pools, run when the connector is built (no network).
    Raise ConnectorOptionError naming the backend and the key it lacks."""

    def check_backends(self, prefill: Sequence[BackendRef], decode: Sequence[BackendRef]
                       ) -> None: ...


@runtime_checkable
class ConnectorStartup(Protocol):
    """Optional: checks that need the network, run once at start-up (e.g. a bootstrap
    server's /query). ``get_json(url)`` GETs a URL and decodes its JSON (it raises
    lb.errors.PdlbError when unreachable, ValueError when not JSON). Raise
    lb.errors.ConfigError with a message naming the backend."""

    async def start(self, prefill: Sequence[BackendRef], decode: Sequence[BackendRef],
                    get_json: Callable[[str], Awaitable[Any]]) -> None: ...


def plain_dispatch(request: RequestView, prefill: BackendRef, decode: BackendRef | None
                   ) -> Dispatch:
    """A dispatch with the client's request id and nothing else (no per-attempt state)."""
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


class ConnectorOptionError(OptionError):
    """A bad ``[kv_transfer]`` option; the message names it (key and value)."""
