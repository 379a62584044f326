"""Per-tenant limits on this replica: requests and tokens per sliding window, and requests
in flight; the 429 over a limit and the ``x-ratelimit-*`` headers under it.

A request is checked against all three at once and takes from all three only when all
allow it, so a refused request costs the tenant nothing. Its tokens (prompt + max_tokens as
admitted) are corrected to the real usage when it ends (:meth:`Taken.finish`); a request
that admission then refuses gives its tokens back (it used none) but still counts as a
request. ``Retry-After`` is when the window will have room for this very request (rounded
up to a whole second), not a guess.

Header names and formats follow OpenAI's (``x-ratelimit-limit-requests``,
``-remaining-requests``, ``-reset-requests`` and the same for ``tokens``; reset as ``1s``,
``6m0s``, ``250ms``); a tenant without a requests (tokens) limit gets no requests (tokens)
headers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from lb.errors import Overloaded
from lb.tenants.config import TenantConfig
from lb.tenants.window import Entry, Window


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``250ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


class RateLimited(Overloaded):
    """429: a tenant's limit; ``reason`` is ``requests``, ``tokens`` or ``concurrent``."""

    def __init__(self, tenant: str, reason: str, message: str, retry_after_s: float,
                 headers: Mapping[str, str]) -> None:
        super().__init__(message, stage="tenant", reason=reason, status=429,
                         retry_after_s=retry_after_s)
        self.code = "rate_limit_exceeded"
        self.error_type = reason  # OpenAI's type for these: "requests" / "tokens"
        self.tenant = tenant
        self._limit_headers = dict(headers)

    def headers(self) -> dict[str, str]:
        return {**self._limit_headers,
                "Retry-After": str(max(1, math.ceil(self.retry_after_s))),
                "X-Pdlb-Reject-Reason": self.reason}


class _State:
    """One tenant's windows and in-flight count on this replica."""

    __slots__ = ("concurrent", "limit", "max_concurrent", "requests", "tokens")

    def __init__(self, tenant: TenantConfig, divisor: int) -> None:
        def part(n: int | None) -> int | None:
            return None if n is None else max(1, n // divisor)

        self.limit = tenant
        requests, tokens = part(tenant.requests), part(tenant.tokens)
        self.requests = None if requests is None else Window(requests, tenant.requests_window_s)
        self.tokens = None if tokens is None else Window(tokens, tenant.tokens_window_s)
        self.max_concurrent = part(tenant.concurrent)
        self.concurrent = 0


def headers_of(req: Window | None, tok: Window | None, now: float) -> dict[str, str]:
    h: dict[str, str] = {}
    if req is not None:
        h["x-ratelimit-limit-requests"] = str(req.limit)
        h["x-ratelimit-remaining-requests"] = str(max(0, req.limit - req.used(now)))
        h["x-ratelimit-reset-requests"] = duration(req.reset_s(now))
    if tok is not None:
        h["x-ratelimit-limit-tokens"] = str(tok.limit)
        h["x-ratelimit-remaining-tokens"] = str(max(0, tok.limit - tok.used(now)))
        h["x-ratelimit-reset-tokens"] = duration(tok.reset_s(now))
    return h


class Taken:
    """What one request took from its tenant's limits; :meth:`finish` gives back what it
    must (once)."""

    __slots__ = ("_entry", "_state", "headers")

    def __init__(self, state: _State | None, entry: Entry | None,
                 headers: Mapping[str, str]) -> None:
        self._state = state
        self._entry = entry
        self.headers = headers

    def finish(self, real_tokens: int | None) -> None:
        """The request ended; ``real_tokens``: its usage (None: keep what was admitted)."""
        state, self._state = self._state, None
        if state is None:
            return
        state.concurrent -= 1
        if self._entry is not None and state.tokens is not None and real_tokens is not None:
            state.tokens.resize(self._entry, real_tokens, time.monotonic())


class LocalLimits:
    """Every configured tenant's limits on this replica (``divisor``: this replica's share
    while the shared ones on Redis do not answer)."""

    def __init__(self, tenants: Mapping[str, TenantConfig], divisor: int = 1) -> None:
        self._states = {name: _State(t, divisor) for name, t in tenants.items() if t.limited}

    def take(self, tenant: str, tokens: int) -> Taken:
        """Take one request and ``tokens`` from ``tenant``'s limits, or raise
        :class:`RateLimited` (or ``too_large``: more tokens than the window ever allows)."""
        state = self._states.get(tenant)
        if state is None:
            return Taken(None, None, {})
        now = time.monotonic()
        req, tok = state.requests, state.tokens
        if tok is not None and tokens > tok.limit:
            raise RateLimited(tenant, "tokens", f"this request needs {tokens} tokens but tenant"
                              f" {tenant!r} may use at most {tok.limit} per"
                              f" {tok.span:g} s; lower max_tokens or shorten the prompt",
                              tok.span, headers_of(req, tok, now))
        most = state.max_concurrent
        if most is not None and state.concurrent >= most:
            raise RateLimited(tenant, "concurrent", f"tenant {tenant!r} has its limit of"
                              f" {most} requests in flight; retry when one ends",
                              1.0, headers_of(req, tok, now))
        if req is not None:
            wait = req.wait_s(1, now)
            if wait > 0:
                raise RateLimited(tenant, "requests", f"rate limit of tenant {tenant!r}:"
                                  f" {req.limit} requests per {req.span:g} s; retry in"
                                  f" {wait:.3g} s", wait, headers_of(req, tok, now))
        if tok is not None:
            wait = tok.wait_s(tokens, now)
            if wait > 0:
                raise RateLimited(tenant, "tokens", f"rate limit of tenant {tenant!r}:"
                                  f" {tok.limit} tokens per {tok.span:g} s, this request"
                                  f" needs {tokens}; retry in {wait:.3g} s", wait,
                                  headers_of(req, tok, now))
        if req is not None:
            req.take(1, now)
        entry = tok.take(tokens, now) if tok is not None else None
        state.concurrent += 1
        return Taken(state, entry, headers_of(req, tok, now))
