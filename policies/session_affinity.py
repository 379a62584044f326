"""``session_affinity``: keep a session on one backend (its KV cache holds the conversation),
unless that backend is overloaded.

The session key is the ``X-Session-Id`` header, else the body's ``user`` field (pdlb's
:attr:`RouteRequest.session_key`), or the header named by the ``header`` option. The first
request of a session goes to the least-loaded backend; later ones follow it while it is
within ``load_factor × mean + load_slack_tokens`` in-flight tokens (mean over the
candidates) and still a candidate. Otherwise the session moves to the least-loaded backend
(which from then on holds its newest turns). Requests without a key go to the least-loaded
backend.

With ``[cluster]``, a session's backend is shared by the replicas (the newest choice of any
replica wins; :attr:`RouteRequest.shared_session`).

Options:

* ``header`` (str, default unset): read the key from this request header instead.
* ``load_factor`` (number ≥ 1, default 1.25) and ``load_slack_tokens`` (int ≥ 0, default
  unset = the request's own tokens): the load bound, as for ``prefix_affinity``.
* ``max_sessions`` (int ≥ 1, default 100000): sessions remembered (LRU).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from policies.base import (
    BackendView,
    RouteRequest,
    check_options,
    int_option,
    number_option,
    read_options,
)
from policies.load import least_loaded, load_limit

NAME = "session_affinity"


class SessionAffinity:
    wants_prefix_hashes = False

    def __init__(self, options: Mapping[str, Any]) -> None:
        check_options(NAME, options, {
            "header": str, "load_factor": (int, float), "load_slack_tokens": int,
            "max_sessions": int,
        })
        header = options.get("header")
        if header is not None and not header.strip():
            raise read_options(NAME, options).fail("header", "must name a header")
        self.header: str | None = header.strip().lower() if header is not None else None
        self.load_factor = number_option(NAME, options, "load_factor", 1.25, minimum=1.0)
        self.load_slack_tokens: int | None = None
        if "load_slack_tokens" in options:
            self.load_slack_tokens = int_option(NAME, options, "load_slack_tokens", 0,
                                                minimum=0)
        self.max_sessions = int_option(NAME, options, "max_sessions", 100_000, minimum=1)
        self._sessions: OrderedDict[str, int] = OrderedDict()
        self._turn = 0

    def session_key(self, request: RouteRequest) -> str | None:
        if self.header is not None:
            return request.headers.get(self.header) or None
        return request.session_key or None

    def pick(self, request: RouteRequest, candidates: Sequence[BackendView]) -> BackendView:
        self._turn += 1
        key = self.session_key(request)
        if key is None:
            return least_loaded(candidates, self._turn)
        sessions = self._sessions
        index = sessions.get(key)
        shared = request.shared_session.get(request.leg)
        if shared is not None:  # another replica routed it last ([cluster]): follow that
            index = next((b.index for b in candidates if b.url == shared), index)
        if index is not None:
            limit = load_limit(request, candidates, self.load_factor, self.load_slack_tokens)
            for backend in candidates:
                if backend.index == index:
                    if backend.inflight_tokens <= limit:
                        self._remember(key, index)
                        return backend
                    break
        chosen = least_loaded(candidates, self._turn)
        self._remember(key, chosen.index)
        return chosen

    def _remember(self, key: str, index: int) -> None:
        sessions = self._sessions
        sessions[key] = index
        sessions.move_to_end(key)
        if len(sessions) > self.max_sessions:
            sessions.popitem(last=False)
