"""``prefix_affinity`` (prefill pool): send prompts that share a prefix to the backend that
already holds it, unless that backend is overloaded.

pdlb hashes the prompt's leading 64-byte blocks (for chat: all messages rendered in order,
so a shared system prompt *and* a shared conversation history both count; see
``lb/prefix.py``). The policy remembers which backends got which prefixes
(:class:`~policies.prefix_index.PrefixIndex`, a bounded LRU) and picks, among the candidates
within the load bound, the one with the longest remembered match (ties: fewer in-flight
tokens). A backend is within the bound while its in-flight tokens are at most
``load_factor × mean + load_slack_tokens`` (mean over the candidates), so a hot prefix
cannot pile onto one backend: past the bound it goes to the least-loaded backend instead,
which then holds it too. A prompt with no known prefix goes to the least-loaded backend.
Every choice is recorded, so later prompts with the same prefix follow it; when the leg
then fails (``on_request_done`` with ``ok=False``) the record is dropped again, since the
backend may have cached nothing.

Options:

* ``load_factor`` (number ≥ 1, default 1.25): the bound, as a multiple of the mean load.
* ``load_slack_tokens`` (int ≥ 0, default unset = the request's own tokens on the leg):
  tokens allowed above ``load_factor × mean``, so that at low load one request in flight
  does not break affinity. 0 is the bare ``load_factor × mean`` bound.
* ``min_match_blocks`` (int ≥ 1, default 1): shorter matches (64-byte blocks) are ignored.
* ``max_entries`` (int ≥ 1, default 100000): prefixes remembered (LRU; ~18 MB at the default).
* ``holders`` (int ≥ 1, default 2): backends remembered per prefix, so a hot prefix that
  spilled over to a second backend keeps hitting on both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from policies.base import BackendView, RouteRequest, check_options, int_option, number_option
from policies.load import least_loaded, load_limit
from policies.prefix_index import PrefixIndex

NAME = "prefix_affinity"


class PrefixAffinity:
    wants_prefix_hashes = True

    def __init__(self, options: Mapping[str, Any]) -> None:
        check_options(NAME, options, {
            "load_factor": (int, float), "load_slack_tokens": int, "min_match_blocks": int,
            "max_entries": int, "holders": int,
        })
        self.load_factor = number_option(NAME, options, "load_factor", 1.25, minimum=1.0)
        self.load_slack_tokens: int | None = None
        if "load_slack_tokens" in options:
            self.load_slack_tokens = int_option(NAME, options, "load_slack_tokens", 0,
                                                minimum=0)
        self.min_match_blocks = int_option(NAME, options, "min_match_blocks", 1, minimum=1)
        self.index = PrefixIndex(
            int_option(NAME, options, "max_entries", 100_000, minimum=1),
            int_option(NAME, options, "holders", 2, minimum=1),
        )
        self._turn = 0

    def pick(self, request: RouteRequest, candidates: Sequence[BackendView]) -> BackendView:
        self._turn += 1
        hashes = request.prefix_hashes
        chosen: BackendView | None = None
        if hashes:
            depth = self.index.match(hashes)
            if depth:
                limit = load_limit(request, candidates, self.load_factor,
                                   self.load_slack_tokens)
                best_key = (0, 0)
                for backend in candidates:
                    matched = depth.get(backend.index, 0)
                    if matched < self.min_match_blocks or backend.inflight_tokens > limit:
                        continue
                    key = (matched, -backend.inflight_tokens)
                    if chosen is None or key > best_key:
                        chosen, best_key = backend, key
        if chosen is None:
            chosen = least_loaded(candidates, self._turn)
        if hashes:
            self.index.record(hashes, chosen.index)
        return chosen

    def on_request_done(
        self, request: RouteRequest, backend: BackendView, ok: bool, duration_s: float
    ) -> None:
        if not ok and request.prefix_hashes:
            self.index.drop(request.prefix_hashes, backend.index)
