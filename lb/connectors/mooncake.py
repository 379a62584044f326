"""vLLM MooncakeConnector: both legs at once, the pair matched by a transfer id.

Start-up (as vLLM's mooncake_connector_proxy.py): each prefill instance runs a bootstrap
HTTP server (port ``VLLM_MOONCAKE_BOOTSTRAP_PORT``, 8998 by default) whose ``GET /query``
answers its data-parallel ranks::

    {"0": {"engine_id": "<id of DP rank 0>", "worker_addr": {"<tp>": {"<pp>": "host:port"}}},
     "1": {...}}

(older vLLM: ``{"<engine_id>": {"<dp_rank>": ...}}``, also understood). pdlb asks every
prefill's bootstrap server before it serves, retrying for ``startup_timeout_s``; a prefill
whose bootstrap never answers stops start-up with an error naming it.

Per dispatch: a DP rank of the chosen prefill (round robin per prefill), a fresh
``transfer_id`` = ``xfer-<uuid>``, then at the same time

* prefill: one token, non-streamed, header ``X-data-parallel-rank: <rank>``,
  ``kv_transfer_params = {"do_remote_decode": true, "do_remote_prefill": false,
  "transfer_id": ...}``;
* decode: the client's body + ``{"do_remote_decode": false, "do_remote_prefill": true,
  "remote_bootstrap_addr": "http://host:port", "remote_engine_id": <that rank's engine>,
  "transfer_id": ...}``.

Options::

    [kv_transfer]
    connector = "mooncake"
    bootstrap_port = 8998          # default for every prefill
    startup_timeout_s = 60         # how long start-up waits for every bootstrap /query

    [kv_transfer.backends."http://10.0.0.1:8100"]
    bootstrap_port = 9000          # this prefill's bootstrap port
    bootstrap_host = "10.0.0.1"    # default: the prefill URL's host

Lease/cleanup: the prefill keeps its blocks until the decode has read them or the transfer
expires (vLLM's ``VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT``); a decode pdlb cancels is aborted by
vLLM, and a prefill pdlb cancels never stages anything. A decode whose prefill failed waits
for KV until vLLM gives up (up to 480 s, #46008) — which is why pdlb cancels it at once.
Prefill backends added by a hot reload were not discovered: requests routed to them fail
with 502 ``not_discovered`` until pdlb restarts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
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
from lb.connectors.options import ConnectorOptions, check_port
from lb.errors import ConfigError, PdlbError, PrefillFailed

log = logging.getLogger("pdlb.connectors.mooncake")

DEFAULT_BOOTSTRAP_PORT = 8998


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def parse_query(data: Any) -> dict[int, str]:
    """``GET /query`` → {dp_rank: engine_id}; ValueError when not (yet) usable."""
    if not isinstance(data, dict) or not data:
        raise ValueError("no data-parallel rank registered yet")
    ranks: dict[int, str] = {}
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise ValueError(f"unexpected /query entry {key!r}: {entry!r}")
        if isinstance(entry.get("engine_id"), str):  # {dp_rank: {engine_id, worker_addr}}
            ranks[int(key)] = entry["engine_id"]
        else:  # older vLLM: {engine_id: {dp_rank: ...}}
            for rank in entry:
                ranks[int(rank)] = str(key)
    if sorted(ranks) != list(range(len(ranks))):
        raise ValueError(f"data-parallel ranks {sorted(ranks)} are not 0..{len(ranks) - 1}")
    return ranks


class MooncakeConnector:
    name = "mooncake"
    mode = HandshakeMode.CONCURRENT

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = ConnectorOptions(
            self.name, options,
            keys={"bootstrap_port": int, "startup_timeout_s": (int, float)},
            backend_keys={"bootstrap_port": int, "bootstrap_host": str},
        )
        check_port("kv_transfer.bootstrap_port",
                   self.options.get("bootstrap_port", DEFAULT_BOOTSTRAP_PORT))
        self.startup_timeout_s = self.options.positive("startup_timeout_s", 60.0)
        self.engines: dict[str, tuple[str, ...]] = {}
        """prefill URL → engine id of each DP rank (index = rank), filled at start-up."""
        self._turns: dict[str, Iterator[int]] = {}

    def check_backends(self, prefill: Sequence[BackendRef], decode: Sequence[BackendRef]
                       ) -> None:
        self.options.check_urls(b.url for b in prefill)
        for backend in prefill:
            self.bootstrap_addr(backend.url)

    def bootstrap_addr(self, url: str) -> str:
        o = self.options
        port = check_port(o.where(url, "bootstrap_port"),
                          o.backend_value(url, "bootstrap_port", DEFAULT_BOOTSTRAP_PORT))
        host = o.backend(url).get("bootstrap_host") or urlsplit(url).hostname or ""
        return f"http://{bracket(host)}:{port}"

    # --------------------------------------------------------------- start-up discovery
    async def start(self, prefill: Sequence[BackendRef], decode: Sequence[BackendRef],
                    get_json: Callable[[str], Awaitable[Any]]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        found = await asyncio.gather(*(self._discover(b.url, get_json, deadline)
                                       for b in prefill))
        for backend, ranks in zip(prefill, found, strict=True):
            self.engines[backend.url] = tuple(ranks[r] for r in range(len(ranks)))
            log.info("mooncake: prefill %s has %d DP rank(s): %s", backend.url, len(ranks),
                     ", ".join(self.engines[backend.url]))

    async def _discover(self, url: str, get_json: Callable[[str], Awaitable[Any]],
                        deadline: float) -> dict[int, str]:
        query = self.bootstrap_addr(url) + "/query"
        while True:
            try:
                return parse_query(await get_json(query))
            except (PdlbError, ValueError) as exc:
                why = exc.message if isinstance(exc, PdlbError) else str(exc)
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"kv_transfer (mooncake): prefill {url}: its bootstrap server {query} gave"
                    f" no usable answer within {self.startup_timeout_s:g} s (last: {why});"
                    f" check {self.options.where(url, 'bootstrap_port')} (default"
                    f" {DEFAULT_BOOTSTRAP_PORT}) and that the prefill runs MooncakeConnector")
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    # --------------------------------------------------------------- the handshake
    def new_dispatch(self, request: RequestView, prefill: BackendRef, decode: BackendRef | None
                     ) -> Dispatch:
        engines = self.engines.get(prefill.url)
        if not engines:
            raise PrefillFailed(
                f"mooncake: prefill {prefill.url} was not discovered at start-up (added by a"
                " reload?); restart pdlb to query its bootstrap server",
                reason="not_discovered")
        turn = self._turns.setdefault(prefill.url, itertools.count())
        rank = next(turn) % len(engines)
        try:
            addr = self.bootstrap_addr(prefill.url)
        except ConnectorOptionError as exc:  # pragma: no cover - checked at build time
            raise PrefillFailed(str(exc), reason="backend_not_configured") from None
        return Dispatch(
            request.request_id, prefill, decode,
            {"transfer_id": new_transfer_id(), "engine_id": engines[rank], "dp_rank": rank,
             "bootstrap_addr": addr},
            prefill_headers={"X-data-parallel-rank": str(rank)},
        )

    def prefill_body(self, request: RequestView, dispatch: Dispatch) -> dict[str, Any]:
        body = one_token_prefill_body(request)
        body["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False,
                                      "transfer_id": dispatch.state["transfer_id"]}
        return body

    def accept_prefill(self, response: Mapping[str, Any], dispatch: Dispatch) -> PrefillResult:
        return prefill_result(response)

    def decode_body(
        self, request: RequestView, dispatch: Dispatch, prefill: PrefillResult | None
    ) -> dict[str, Any]:
        body = dict(request.body)
        body["kv_transfer_params"] = {
            "do_remote_decode": False,
            "do_remote_prefill": True,
            "remote_bootstrap_addr": dispatch.state["bootstrap_addr"],
            "remote_engine_id": dispatch.state["engine_id"],
            "transfer_id": dispatch.state["transfer_id"],
        }
        return body
