"""SGLang PD disaggregation: one body, three bootstrap fields, both legs at once.

SGLang's router (``sglang_router`` / the old ``mini_lb``) adds to the client's body::

    "bootstrap_host": <the prefill's host>, "bootstrap_port": <its bootstrap port>,
    "bootstrap_room": <a random 63-bit integer>

and sends that same body to the prefill and the decode server at the same time; the decode
asks the prefill's bootstrap server where the prefill ranks are and receives the KV of
``bootstrap_room`` from them; the decode's answer goes back to the client. pdlb does the
same, with one difference: it reads the prefill's answer as JSON (for usage), so the
prefill leg goes out with ``stream = false`` and without ``stream_options``. SGLang's
prefill server only computes the first token whatever ``max_tokens`` says.

Options::

    [kv_transfer]
    connector = "sglang"
    bootstrap_port = 8998        # every prefill's --disaggregation-bootstrap-port...
    check_bootstrap = true       # start-up: GET http://host:bootstrap_port/health
    startup_timeout_s = 30

    [kv_transfer.backends."http://10.0.0.1:30000"]
    bootstrap_port = 8999        # ...or per prefill
    bootstrap_host = "10.0.0.1"  # default: the prefill URL's host

Start-up validation: every prefill backend has a bootstrap port (there is deliberately no
silent default: a wrong port makes every decode wait for a room that never fills), and, with
``check_bootstrap``, its bootstrap server answers ``GET /health`` within
``startup_timeout_s`` (SGLang answers 200 ``OK``).

Lease/cleanup: a room lives on the prefill until the decode took it or SGLang's bootstrap
timeout (``SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT``) ends it; pdlb cancels the other leg
when one fails and both when the client leaves, which SGLang turns into aborts.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from lb.connectors.base import (
    BackendRef,
    ConnectorOptionError,
    Dispatch,
    HandshakeMode,
    PrefillResult,
    RequestView,
    prefill_result,
)
from lb.connectors.mooncake import bracket
from lb.connectors.options import ConnectorOptions, check_port
from lb.errors import ConfigError, PdlbError, PrefillFailed


def new_bootstrap_room() -> int:
    """A random 63-bit room, as SGLang's router draws it."""
    return secrets.randbits(63)


class SGLangConnector:
    name = "sglang"
    mode = HandshakeMode.CONCURRENT

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = ConnectorOptions(
            self.name, options,
            keys={"bootstrap_port": int, "check_bootstrap": bool,
                  "startup_timeout_s": (int, float)},
            backend_keys={"bootstrap_port": int, "bootstrap_host": str},
        )
        self.check_bootstrap: bool = self.options.get("check_bootstrap", True)
        self.startup_timeout_s = self.options.positive("startup_timeout_s", 30.0)

    def check_backends(self, prefill: Sequence[BackendRef], decode: Sequence[BackendRef]
                       ) -> None:
        urls = [b.url for b in prefill]
        self.options.check_urls(urls)
        missing = [u for u in urls if self.options.backend_value(u, "bootstrap_port") is None]
        if missing:
            raise ConnectorOptionError(
                "connector 'sglang' needs the bootstrap port of every prefill"
                " (--disaggregation-bootstrap-port, 8998 unless set): give"
                " kv_transfer.bootstrap_port for all, or"
                f' [kv_transfer.backends."{missing[0]}"] bootstrap_port = ...; none for:'
                f" {', '.join(missing)}")
        for url in urls:
            self.bootstrap(url)

    def bootstrap(self, url: str) -> tuple[str, int]:
        """(bootstrap_host, bootstrap_port) of a prefill backend."""
        o = self.options
        port = check_port(o.where(url, "bootstrap_port"), o.backend_value(url, "bootstrap_port"))
        host = o.backend(url).get("bootstrap_host") or urlsplit(url).hostname or ""
        return bracket(host), port

    # --------------------------------------------------------------- start-up
    async def start(self, prefill: Sequence[BackendRef], decode: Sequence[BackendRef],
                    get_json: Callable[[str], Awaitable[Any]]) -> None:
        if not self.check_bootstrap:
            return
        deadline = time.monotonic() + self.startup_timeout_s
        await asyncio.gather(*(self._reachable(b.url, get_json, deadline) for b in prefill))

    async def _reachable(self, url: str, get_json: Callable[[str], Awaitable[Any]],
                         deadline: float) -> None:
        host, port = self.bootstrap(url)
        health = f"http://{host}:{port}/health"
        while True:
            try:
                await get_json(health)
                return
            except ValueError:
                return  # a 200 whose body is not JSON: SGLang's plain "OK"
            except PdlbError as exc:
                why = exc.message
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"kv_transfer (sglang): prefill {url}: its bootstrap server {health} did not"
                    f" answer within {self.startup_timeout_s:g} s (last: {why}); check"
                    f" {self.options.where(url, 'bootstrap_port')} or set check_bootstrap ="
                    " false")
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    # --------------------------------------------------------------- the handshake
    def new_dispatch(self, request: RequestView, prefill: BackendRef, decode: BackendRef | None
                     ) -> Dispatch:
        try:
            host, port = self.bootstrap(prefill.url)
        except ConnectorOptionError as exc:  # a backend added by a reload, unconfigured
            raise PrefillFailed(f"sglang: {exc}", reason="backend_not_configured") from None
        return Dispatch(request.request_id, prefill, decode,
                        {"bootstrap_host": host, "bootstrap_port": port,
                         "bootstrap_room": new_bootstrap_room()})

    def _with_bootstrap(self, request: RequestView, dispatch: Dispatch) -> dict[str, Any]:
        body = dict(request.body)
        for key in ("bootstrap_host", "bootstrap_port", "bootstrap_room"):
            body[key] = dispatch.state[key]
        return body

    def prefill_body(self, request: RequestView, dispatch: Dispatch) -> dict[str, Any]:
        body = self._with_bootstrap(request, dispatch)
        body["stream"] = False
        body.pop("stream_options", None)
        return body

    def accept_prefill(self, response: Mapping[str, Any], dispatch: Dispatch) -> PrefillResult:
        return prefill_result(response)

    def decode_body(
        self, request: RequestView, dispatch: Dispatch, prefill: PrefillResult | None
    ) -> dict[str, Any]:
        return self._with_bootstrap(request, dispatch)
