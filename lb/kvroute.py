"""The request path's side of KV-event routing: token ids in, cached tokens per backend out.

The proxy (lb/proxy.py) calls this at four points of a request's journey, and nowhere else
knows about KV events:

1. :meth:`KVRoute.prompt_ids` — the prompt's exact token ids (``[tokenizer]``: the model's
   tokenizer and chat template, or the explicit ``token_ids = "backend"`` fallback, POST
   /tokenize on a prefill backend), computed once; the proxy then counts the prompt as
   ``len(ids)``, so routing and admission agree with the engine.
2. :meth:`KVRoute.for_leg` — the leg's :class:`RouteRequest` with ``cached_tokens`` filled
   from that pool's index (fresh backends only), when the pool's policy wants them, and
   for the prefill pool whenever it has an index (the prediction metrics below need it).
3. :meth:`KVRoute.picked` — counts whether a KV-aware pick rested on events or on the
   approximate fallback; :meth:`KVRoute.direct` asks the decode policy whether one decode
   already holds the prompt (no prefill hop).
4. :meth:`KVRoute.prefill_done` — compares the prediction with the ``cached_tokens`` the
   prefill reported (``pdlb_kv_predictions_total``, ``pdlb_kv_prediction_error_tokens``)
   and tells the pool's freshness tracker a leg ended (lb/backends/kvevents/lookup.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson

from lb.backends.pool import Backend, Pool
from lb.backends.upstream import Upstream
from lb.config import Config
from lb.connectors.base import PrefillResult
from lb.errors import InvalidRequest
from lb.metrics import Metrics
from lb.prompt_ids import PromptIds, make_prompt_ids, tokenize_on_backend
from policies.base import Leg, RouteRequest

log = logging.getLogger("pdlb.kvroute")


class KVRoute:
    """Token ids, per-pool cached tokens and prediction metrics for one pdlb app."""

    def __init__(self, config: Config, pools: Mapping[str, Pool], upstream: Upstream,
                 metrics: Metrics) -> None:
        self.pools = pools
        self.upstream = upstream
        self.metrics = metrics
        self.offload_chars = config.tokenizer.offload_chars
        self.timeout_s = config.server.timeouts.prefill_s
        self.source = config.tokenizer.token_ids
        self.local: PromptIds | None = make_prompt_ids(config.tokenizer)
        self._ids_timer = {s: metrics.prompt_ids.labels(source=s) for s in ("local", "backend")}
        self._enabled: bool | None = None

    @property
    def enabled(self) -> bool:
        """Token ids are worth computing: some pool has an event index to look them up in
        (decided at the first request: the app sets ``pool.kv`` after building the proxy,
        and ``[kv_events]`` needs a restart to change)."""
        if self._enabled is None:
            self._enabled = (self.local is not None or self.source == "backend") and any(
                pool.kv is not None for pool in self.pools.values())
        return self._enabled

    # ----------------------------------------------------------------- 1. token ids
    async def prompt_ids(self, endpoint: str, body: Mapping[str, Any], body_bytes: int,
                         ) -> list[int] | None:
        started = time.perf_counter()
        if self.local is not None:
            if body_bytes > self.offload_chars:
                ids = await asyncio.to_thread(self.local.ids, endpoint, body)
            else:
                ids = self.local.ids(endpoint, body)
            self._ids_timer["local"].observe(time.perf_counter() - started)
            return ids
        backend = next((b for b in self.pools["prefill"].backends if b.usable()), None)
        if backend is None:
            return None
        ids = await tokenize_on_backend(self._post_json, backend.url, endpoint, body)
        self._ids_timer["backend"].observe(time.perf_counter() - started)
        return ids

    async def _post_json(self, url: str, body: bytes) -> Any:
        return await self.upstream.post_json(url, body, {"content-type": "application/json"},
                                             timeout_s=self.timeout_s, what=f"tokenize {url}")

    async def lookup(self, raw: bytes) -> dict[str, Any]:
        """``POST /admin/kv/lookup``: a completion (``prompt``) or chat (``messages``) body →
        its token count and, per pool and backend, the cached tokens the events report
        (``null`` for a backend without live, fresh events)."""
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}",
                                 code="invalid_json") from None
        if not isinstance(body, dict) or not ("prompt" in body or "messages" in body):
            raise InvalidRequest("expected a completion or chat request body (prompt or "
                                 "messages)", code="invalid_value")
        endpoint = "chat" if "messages" in body else "completions"
        ids = await self.prompt_ids(endpoint, body, len(raw)) if self.enabled else None
        pools: dict[str, Any] = {}
        for name, pool in self.pools.items():
            if pool.kv is None:
                continue
            found = {} if ids is None else pool.kv.cached_tokens(ids, body.get("model"))
            pools[name] = {b.url: found.get(b.url) for b in pool.backends}
        source = "local" if self.local else "backend" if self.source == "backend" else "off"
        return {"token_ids": source,
                "prompt_tokens": None if ids is None else len(ids), "pools": pools}

    # ----------------------------------------------------------------- 2. per-leg routes
    def for_leg(self, route: RouteRequest, leg: Leg) -> RouteRequest:
        """``route`` for ``leg``, with that pool's cached tokens when they are wanted."""
        pool = self.pools[leg]
        wanted = pool.kv is not None and route.prompt_token_ids is not None and (
            pool.wants_cached_tokens or pool.direct is not None or leg == "prefill")
        if route.leg == leg and (route.cached_tokens is not None or not wanted):
            return route  # already this leg's (a retry, or the direct decode's route)
        cached = pool.cached_tokens(route) if wanted else None
        return dataclasses.replace(route, leg=leg, cached_tokens=cached)

    # ----------------------------------------------------------------- 3. picks
    def picked(self, pool: Pool, route: RouteRequest, backend: Backend) -> None:
        if pool.wants_cached_tokens and route.cached_tokens is not None:
            source = "events" if backend.url in route.cached_tokens else "approximate"
            self.metrics.kv_route_picks.labels(pool=pool.name, source=source).inc()

    def direct(self, route: RouteRequest) -> Backend | None:
        """The decode that should serve the request alone, if the decode policy names one
        (it already holds the prompt)."""
        pool = self.pools["decode"]
        if pool.direct is None:
            return None
        return pool.pick_direct(self.for_leg(route, "decode"))

    # ----------------------------------------------------------------- 4. predictions
    def prefill_done(self, route: RouteRequest, backend: Backend, result: PrefillResult,
                     ) -> None:
        kv = self.pools["prefill"].kv
        if kv is None or route.cached_tokens is None:
            return
        predicted = route.cached_tokens.get(backend.url)
        prompt_tokens = result.prompt_tokens or route.prompt_tokens
        kv.leg_done(backend.url, prompt_tokens, predicted)
        actual = result.cached_tokens
        if predicted is None or actual is None:
            return
        m = self.metrics
        outcome = "exact" if predicted == actual else "over" if predicted > actual else "under"
        m.kv_predictions.labels(pool="prefill", outcome=outcome).inc()
        m.kv_prediction_error.labels(pool="prefill").observe(abs(predicted - actual))
        m.kv_predicted_tokens.labels(pool="prefill").inc(predicted)
        m.kv_reported_tokens.labels(pool="prefill").inc(actual)
        if outcome != "exact":
            log.debug("request %s: %s predicted %d cached tokens, reported %d",
                      route.request_id, backend.url, predicted, actual)

    def decode_done(self, route: RouteRequest, backend: Backend) -> None:
        kv = self.pools["decode"].kv
        if kv is not None and route.cached_tokens is not None:
            kv.leg_done(backend.url, route.prompt_tokens, route.cached_tokens.get(backend.url))

