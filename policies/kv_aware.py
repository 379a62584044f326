"""``kv_aware`` (either pool): route by what each engine's own KV events say it holds.

It is :mod:`policies.score` — the same load filter, the same weighted scorers and weights
(``load``, ``prefix``, ``kv_usage``, ``queue``) — with the ``prefix`` scorer fed by the
truth instead of a guess: for a backend whose events are live and fresh,
:attr:`RouteRequest.cached_tokens` gives the prompt tokens it holds, and the scorer is
``cached / prompt`` (exact, whatever reached that backend: other pdlb replicas, other
clients, evictions, restarts). For a backend without live events (not publishing,
reconnecting after a gap, silent after work that stored blocks — see
``lb/backends/kvevents/lookup.py``) it falls back, per backend, to the approximate index of
``prefix_affinity``/``score`` (what this process sent where); pdlb counts picks of each kind
in ``pdlb_kv_route_picks_total{source="events"|"approximate"}``.

The trade against load is ``score``'s: inside the load bound, with ``load = 1`` and
``prefix = 1``, a backend holding a fraction ``f`` of the prompt wins while its excess
in-flight tokens over the least-loaded backend stay below ``f / (1 - f)`` times the
request's own tokens; outside the bound (``load_factor × mean + slack``) it is not a
candidate at all, so a hot prefix spreads instead of piling up.

On the **decode** pool it also decides conditional disaggregation: when a usable decode
backend within the load bound already holds at least ``skip_prefill_share`` of the prompt,
pdlb skips the prefill hop and that decode serves the request alone (it computes only the
uncached tail; no KV transfer). Counted in ``pdlb_kv_skipped_prefill_total``.

Options — everything of ``score`` (``weights``, ``load_factor``, ``load_slack_tokens``,
``max_scrape_age_s``, ``max_entries``, ``holders``), plus:

* ``skip_prefill_share`` (number in 0..1, default 0.9; decode pool only): the share of the
  prompt a decode must hold for the prefill hop to be skipped; 1.0 needs the whole prompt
  but its last token, 0 turns the skip off.
* ``approximate_fallback`` (bool, default true): score backends without live events by the
  approximate index; false scores them 0 (never preferred for a prefix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from policies.base import BackendView, RouteRequest, number_option, read_options
from policies.options import Kind
from policies.score import Score

NAME = "kv_aware"
_OWN_OPTIONS: dict[str, Kind] = {"skip_prefill_share": (int, float), "approximate_fallback": bool}


class KVAware(Score):
    wants_cached_tokens = True

    def __init__(self, options: Mapping[str, Any]) -> None:
        table = read_options(NAME, options)
        table.check({**Score.OPTIONS, **_OWN_OPTIONS})
        super().__init__({k: v for k, v in options.items() if k not in _OWN_OPTIONS},
                         name=NAME)
        self.skip_prefill_share = number_option(NAME, options, "skip_prefill_share", 0.9,
                                                minimum=0.0, maximum=1.0)
        self.approximate_fallback = bool(options.get("approximate_fallback", True))
        self.wants_prefix_hashes = self.weights["prefix"] > 0 and self.approximate_fallback

    def score_prefix(
        self, request: RouteRequest, candidates: Sequence[BackendView]
    ) -> list[float]:
        cached = request.cached_tokens
        if not cached:
            return super().score_prefix(request, candidates) if self.approximate_fallback \
                else [0.0] * len(candidates)
        total = _prompt_length(request)
        approximate: list[float] | None = None
        out = []
        for i, b in enumerate(candidates):
            held = cached.get(b.url)
            if held is not None:
                out.append(held / total)
                continue
            if approximate is None:
                approximate = (super().score_prefix(request, candidates)
                               if self.approximate_fallback else [0.0] * len(candidates))
            out.append(approximate[i])
        return out

    def pick_direct(self, request: RouteRequest, candidates: Sequence[BackendView]
                    ) -> BackendView | None:
        """A decode within the load bound holding ``skip_prefill_share`` of the prompt."""
        cached = request.cached_tokens
        if not cached or self.skip_prefill_share <= 0:
            return None
        need = self.skip_prefill_share * (_prompt_length(request) - 1)
        holders = [b for b in self.within_bound(request, candidates)
                   if cached.get(b.url, -1) >= need > 0]
        if not holders:
            return None
        return max(holders, key=lambda b: (cached[b.url], -b.inflight_tokens))


def _prompt_length(request: RouteRequest) -> int:
    ids = request.prompt_token_ids
    return max(len(ids) if ids is not None else request.prompt_tokens, 1)
