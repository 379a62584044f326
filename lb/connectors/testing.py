"""Fakes for unit-testing a connector without pdlb, backends, sockets or an event loop.

    from lb.connectors.testing import build, completion_answer, request, run_handshake

    connector = build("nixl_push", {"backends": {"http://p0:8100": {"engine_id": "e0"}}},
                      prefill=["http://p0:8100"])       # pdlb's own start-up checks
    legs = run_handshake(connector, request(prompt="hi", max_tokens=8),
                         prefill_answer=completion_answer(kv_transfer_params={...}))
    assert legs.prefill_body["max_tokens"] == 1
    assert legs.decode_body["kv_transfer_params"]["transfer_id"] == legs.dispatch.state[...]

:func:`run_handshake` calls the connector in the order and with the arguments pdlb's proxy
uses for its :class:`~lb.connectors.base.HandshakeMode`: ``new_dispatch`` (with the decode
backend only in the DECODE_FIRST and CONCURRENT modes), ``prefill_body``, ``accept_prefill``
on the prefill's answer, and ``decode_body`` (with ``prefill=None`` in the CONCURRENT mode,
the accepted result otherwise). Both bodies must be JSON-serialisable, as pdlb sends them.
A veto (:class:`lb.errors.PrefillFailed`) raised by ``accept_prefill`` propagates.
:func:`fake_get_json` stands in for the ``get_json`` a :class:`ConnectorStartup` receives.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lb.connectors.base import (
    BackendRef,
    Connector,
    Dispatch,
    HandshakeMode,
    PrefillResult,
    RequestView,
)
from lb.connectors.registry import build_connector
from lb.errors import BackendConnectError

PREFILL_URL = "http://prefill-0:8100"
DECODE_URL = "http://decode-0:8200"
_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def build(name: str, options: Mapping[str, Any] | None = None, *,
          prefill: Sequence[str] = (PREFILL_URL,), decode: Sequence[str] = (DECODE_URL,)
          ) -> Connector:
    """Connector ``name`` (a built-in, or an installed plugin's entry point) built as pdlb
    builds it at start-up: options checked, ``check_backends`` run on these pools' URLs.
    A bad option raises :class:`lb.errors.ConfigError` with pdlb's message."""
    return build_connector(name, options or {}, "<test>", prefill=prefill, decode=decode)


def backend(url: str = PREFILL_URL) -> BackendRef:
    """The view of a backend at ``url`` that pdlb would pass."""
    return BackendRef.of(url)


def request(prompt: str | None = None, *, messages: Sequence[Mapping[str, Any]] | None = None,
            request_id: str = "req-1", **fields: Any) -> RequestView:
    """A client request: a completion (``prompt``) or a chat (``messages``); ``fields`` are
    more body fields (``max_tokens=8``, ``stream=True``...)."""
    if prompt is not None and messages is not None:
        raise ValueError("request: give prompt or messages, not both")
    endpoint: Literal["completions", "chat"] = "chat" if messages is not None else "completions"
    body: dict[str, Any] = ({"messages": list(messages)} if messages is not None
                            else {"prompt": "Hello" if prompt is None else prompt})
    body.update(fields)
    return RequestView(body=body, request_id=request_id, endpoint=endpoint,
                       path=_PATHS[endpoint], stream=bool(body.get("stream")))


def completion_answer(prompt_tokens: int = 5, cached_tokens: int | None = None,
                      **fields: Any) -> dict[str, Any]:
    """A prefill's JSON answer as vLLM gives it (one token), plus ``fields`` (e.g.
    ``kv_transfer_params={...}``)."""
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": 1,
                             "total_tokens": prompt_tokens + 1}
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return {"id": "cmpl-test", "object": "text_completion", "model": "test",
            "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
            "usage": usage, **fields}


@dataclass(frozen=True, slots=True)
class Handshake:
    """What a connector produced for one attempt, in pdlb's order."""

    dispatch: Dispatch
    prefill_body: dict[str, Any]
    prefill: PrefillResult
    """``accept_prefill``'s result on the prefill's answer."""
    decode_body: dict[str, Any]


def run_handshake(
    connector: Connector,
    client: RequestView | None = None,
    *,
    prefill: BackendRef | str = PREFILL_URL,
    decode: BackendRef | str = DECODE_URL,
    prefill_answer: Mapping[str, Any] | None = None,
) -> Handshake:
    """One attempt of ``client`` (default: :func:`request`) through ``connector``, as pdlb
    runs it; ``prefill_answer`` (default: :func:`completion_answer`) is the prefill's JSON."""
    client = client or request()
    p = prefill if isinstance(prefill, BackendRef) else BackendRef.of(prefill)
    d = decode if isinstance(decode, BackendRef) else BackendRef.of(decode)
    mode = connector.mode
    known_decode = d if mode in (HandshakeMode.DECODE_FIRST, HandshakeMode.CONCURRENT) else None
    dispatch = connector.new_dispatch(client, p, known_decode)
    prefill_body = _serialisable("prefill_body", connector.prefill_body(client, dispatch))
    answer = completion_answer() if prefill_answer is None else prefill_answer
    if mode is HandshakeMode.CONCURRENT:  # both legs leave before the prefill answered
        decode_body = connector.decode_body(client, dispatch, None)
        result = connector.accept_prefill(answer, dispatch)
    else:
        result = connector.accept_prefill(answer, dispatch)
        decode_body = connector.decode_body(client, dispatch, result)
    return Handshake(dispatch=dispatch, prefill_body=prefill_body, prefill=result,
                     decode_body=_serialisable("decode_body", decode_body))


def fake_get_json(answers: Mapping[str, Any]) -> Callable[[str], Awaitable[Any]]:
    """A ``get_json`` for :meth:`ConnectorStartup.start`: the answer for each known URL; an
    unknown URL fails as an unreachable server does in pdlb."""

    async def get_json(url: str) -> Any:
        if url not in answers:
            raise BackendConnectError(f"cannot connect to {url}", code="backend_connect_error")
        return answers[url]

    return get_json


def _serialisable(what: str, body: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise TypeError(f"{what} returned {type(body).__name__}, not a dict")
    try:
        json.dumps(body)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} is not JSON-serialisable: {exc}") from None
    return body
