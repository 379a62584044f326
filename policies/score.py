"""``score``: a load filter, then a weighted sum of scorers, in the spirit of llm-d's filter
and scorer plugins.

First, candidates over the load bound (in-flight tokens above ``load_factor × mean +
load_slack_tokens``, as for ``prefix_affinity``) are dropped, unless that drops them all;
this is what keeps a hot prefix from overloading one backend whatever the weights. Then
every scorer rates every remaining candidate from 0 (worst) to 1 (best) and the highest
weighted sum wins (ties rotate). Weights come from config; a scorer with weight 0 is not
computed. The scorers:

* ``load`` — pdlb's in-flight tokens, live: ``1 - (t - t_min) / (t_max - t_min + r)`` where
  ``r`` is this request's own tokens on the leg (prompt; for decode prompt + max_tokens).
  Differences count relative to the request's size, not the absolute load level, so the
  trade against a prefix hit stays the same at low and high load.
* ``prefix`` — the fraction of the prompt's leading blocks the backend was last seen to
  hold (the same bounded index as ``prefix_affinity``; every choice is recorded, and
  dropped again when the leg fails).
* ``kv_usage`` — ``1 - vllm:kv_cache_usage_perc`` from the latest scrape.
* ``queue`` — ``vllm:num_requests_waiting`` from the latest scrape, min-max scaled:
  ``1 - (q - q_min) / (q_max - q_min + 1)``.

Scraped scorers are up to one scrape interval old; a backend with no sample, or one older
than ``max_scrape_age_s``, gets the mean of the others (neutral). Within the bound, with
``load = 1`` and ``prefix = 1`` a backend holding a fraction ``f`` of the prompt wins while
its excess load over the least-loaded backend is below ``f / (1 - f)`` times the request's
size; raise the ``load`` weight to trade cache hits for balance.

Options:

* ``weights`` (table, default ``{load = 1.0, prefix = 1.0, kv_usage = 0.0, queue = 0.0}``):
  names not given keep their default; each weight a number ≥ 0, at least one > 0.
* ``load_factor`` (number ≥ 1, default 1.25) and ``load_slack_tokens`` (int ≥ 0, default
  unset = the request's own tokens): the filter's bound; a huge factor disables it.
* ``max_scrape_age_s`` (number > 0, default 5.0).
* ``max_entries`` (int ≥ 1, default 100000) and ``holders`` (int ≥ 1, default 2): the
  prefix index, as for ``prefix_affinity``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from policies.base import (
    BackendView,
    RouteRequest,
    check_options,
    int_option,
    number_option,
    read_options,
)
from policies.load import load_limit, request_tokens
from policies.options import Kind
from policies.prefix_index import PrefixIndex

NAME = "score"
Scorer = Callable[[RouteRequest, Sequence[BackendView]], list[float]]
DEFAULT_WEIGHTS: Mapping[str, float] = {"load": 1.0, "prefix": 1.0, "kv_usage": 0.0,
                                        "queue": 0.0}


def _weights(name: str, options: Mapping[str, Any]) -> dict[str, float]:
    table = read_options(name, options)
    given = table.sub("weights")
    given.check(dict.fromkeys(DEFAULT_WEIGHTS, (int, float)))
    weights = dict(DEFAULT_WEIGHTS)
    for name in given:
        weights[name] = given.number(name, 0.0, minimum=0.0)
    if not any(weights.values()):
        raise table.fail("weights", "give some scorer a weight > 0")
    return weights


def _neutral_fill(values: list[float | None]) -> list[float]:
    known = [v for v in values if v is not None]
    fill = sum(known) / len(known) if known else 0.0
    return [fill if v is None else v for v in values]


class Score:
    OPTIONS: Mapping[str, Kind] = {
        "weights": dict, "load_factor": (int, float), "load_slack_tokens": int,
        "max_scrape_age_s": (int, float), "max_entries": int, "holders": int,
    }

    def __init__(self, options: Mapping[str, Any], *, name: str = NAME) -> None:
        """``name``: the policy named in option errors (a subclass passes its own)."""
        check_options(name, options, self.OPTIONS)
        self.weights = _weights(name, options)
        self.load_factor = number_option(name, options, "load_factor", 1.25, minimum=1.0)
        self.load_slack_tokens: int | None = None
        if "load_slack_tokens" in options:
            self.load_slack_tokens = int_option(name, options, "load_slack_tokens", 0,
                                                minimum=0)
        self.max_scrape_age_s = number_option(name, options, "max_scrape_age_s", 5.0,
                                              minimum=1e-9)
        self.index = PrefixIndex(
            int_option(name, options, "max_entries", 100_000, minimum=1),
            int_option(name, options, "holders", 2, minimum=1),
        )
        # An instance attribute: it depends on the options.
        self.wants_prefix_hashes = self.weights["prefix"] > 0
        scorers: dict[str, Scorer] = {
            "load": self.score_load, "prefix": self.score_prefix,
            "kv_usage": self.score_kv_usage, "queue": self.score_queue,
        }
        self._active = [(w, scorers[name]) for name, w in self.weights.items() if w > 0]
        self._turn = 0

    # ----------------------------------------------------------------- scorers
    def score_load(self, request: RouteRequest, candidates: Sequence[BackendView]) -> list[float]:
        own = request_tokens(request)
        tokens = [b.inflight_tokens for b in candidates]
        low = min(tokens)
        span = max(tokens) - low + max(own, 1)
        return [1.0 - (t - low) / span for t in tokens]

    def score_prefix(
        self, request: RouteRequest, candidates: Sequence[BackendView]
    ) -> list[float]:
        hashes = request.prefix_hashes
        if not hashes:
            return [0.0] * len(candidates)
        depth = self.index.match(hashes)
        total = len(hashes)
        return [depth.get(b.index, 0) / total for b in candidates]

    def score_kv_usage(
        self, request: RouteRequest, candidates: Sequence[BackendView]
    ) -> list[float]:
        max_age = self.max_scrape_age_s
        return _neutral_fill([
            None if b.load is None or b.load.age_s > max_age else 1.0 - b.load.kv_usage
            for b in candidates
        ])

    def score_queue(self, request: RouteRequest, candidates: Sequence[BackendView]) -> list[float]:
        max_age = self.max_scrape_age_s
        waiting = [None if b.load is None or b.load.age_s > max_age else b.load.waiting
                   for b in candidates]
        known = [w for w in waiting if w is not None]
        if not known:
            return [0.0] * len(candidates)
        low = min(known)
        span = max(known) - low + 1.0
        return _neutral_fill([None if w is None else 1.0 - (w - low) / span for w in waiting])

    # ----------------------------------------------------------------- the pick
    def scores(self, request: RouteRequest, candidates: Sequence[BackendView]) -> list[float]:
        """The weighted sum per candidate, before the load filter (for tests, debugging)."""
        total = [0.0] * len(candidates)
        for weight, scorer in self._active:
            for i, value in enumerate(scorer(request, candidates)):
                total[i] += weight * value
        return total

    def within_bound(
        self, request: RouteRequest, candidates: Sequence[BackendView]
    ) -> Sequence[BackendView]:
        """The load filter: candidates within the bound, or all of them if none is."""
        limit = load_limit(request, candidates, self.load_factor, self.load_slack_tokens)
        allowed = [b for b in candidates if b.inflight_tokens <= limit]
        return allowed or candidates

    def pick(self, request: RouteRequest, candidates: Sequence[BackendView]) -> BackendView:
        self._turn += 1
        candidates = self.within_bound(request, candidates)
        total = self.scores(request, candidates)
        n = len(candidates)
        start = self._turn % n
        best = start
        for k in range(1, n):
            i = (start + k) % n
            if total[i] > total[best]:
                best = i
        chosen = candidates[best]
        if self.wants_prefix_hashes and request.prefix_hashes:
            self.index.record(request.prefix_hashes, chosen.index)
        return chosen

    def on_request_done(
        self, request: RouteRequest, backend: BackendView, ok: bool, duration_s: float
    ) -> None:
        """A failed leg may have cached nothing: forget its prefix record."""
        if not ok and self.wants_prefix_hashes and request.prefix_hashes:
            self.index.drop(request.prefix_hashes, backend.index)
