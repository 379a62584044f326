"""Fakes for unit-testing a policy's ``pick`` without pdlb, sockets or an event loop.

    from policies.testing import FakeBackend, backends, make_request, simulate

    pool = backends(3)                       # FakeBackend(index=0..2), idle and healthy
    pool[0].inflight_tokens = 5000
    assert MyPolicy({}).pick(make_request(prompt_tokens=100), pool) is not pool[0]

    # Route 100 requests with pdlb's bookkeeping: each pick charges the chosen backend,
    # at most 8 stay in flight (the oldest finishes first; on_request_done is called).
    chosen = simulate(MyPolicy({}), [make_request(prompt="...") for _ in range(100)],
                      backends(4), concurrency=8)

:func:`simulate` asks the policy through :func:`policies.choose.choose`, the function
``lb.backends.pool.Pool.pick`` uses: only healthy backends under their token budget are
candidates, the policy is asked even when one is left, and a pick that is not one of the
candidates raises :class:`~policies.choose.NotACandidate` (no usable backend at all:
:class:`~policies.choose.NoCandidate`).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from policies.base import Leg, Policy, PolicyHooks, RouteRequest, ScrapedLoad
from policies.choose import choose
from policies.load import request_tokens

_ids = itertools.count()


@dataclass(eq=False)
class FakeBackend:
    """A mutable :class:`~policies.base.BackendView`: set the fields a test needs."""

    index: int
    url: str = ""
    healthy: bool = True
    inflight_requests: int = 0
    inflight_tokens: int = 0
    tokens_since_scrape: int = 0
    load: ScrapedLoad | None = None
    max_inflight_tokens: int | None = None
    """Like a configured budget: :func:`simulate` skips the backend when it is reached."""
    picks: int = field(default=0)
    """How many times :func:`simulate` routed to this backend."""

    def __post_init__(self) -> None:
        if not self.url:
            self.url = f"http://fake-{self.index}:8000"

    def usable(self) -> bool:
        limit = self.max_inflight_tokens
        return self.healthy and (limit is None or self.inflight_tokens < limit)


def backends(n: int, **fields: object) -> list[FakeBackend]:
    """``n`` fake backends with indices 0..n-1; ``fields`` apply to all of them."""
    return [FakeBackend(index=i, **fields) for i in range(n)]  # type: ignore[arg-type]


def make_request(
    prompt: str | None = None,
    *,
    messages: Sequence[Mapping[str, str]] | None = None,
    leg: Leg = "prefill",
    prompt_tokens: int | None = None,
    max_tokens: int = 16,
    session_key: str | None = None,
    headers: Mapping[str, str] | None = None,
    model: str | None = None,
    request_id: str | None = None,
) -> RouteRequest:
    """A RouteRequest as pdlb would build it. Give ``prompt`` (a completion) or ``messages``
    (a chat) to get pdlb's real prefix hashes; ``prompt_tokens`` defaults to the text's
    length / 4 (about what a tokenizer counts for English)."""
    from lb.prefix import prefix_hashes  # pdlb's own hashing, so tests see what pdlb sends

    if prompt is not None and messages is not None:
        raise ValueError("make_request: give prompt or messages, not both")
    endpoint = "chat" if messages is not None else "completions"
    body: dict[str, object] = {"messages": list(messages)} if messages is not None else {
        "prompt": prompt or ""}
    text_len = len(prompt or "") + sum(len(m.get("content", "")) for m in messages or ())
    return RouteRequest(
        request_id=request_id or f"req-{next(_ids)}",
        leg=leg,
        endpoint=endpoint,
        model=model,
        prompt_tokens=prompt_tokens if prompt_tokens is not None else max(1, text_len // 4),
        max_tokens=max_tokens,
        session_key=session_key,
        prefix_hashes=prefix_hashes(endpoint, body) if (prompt or messages) else (),
        headers=dict(headers or {}),
    )


def simulate(
    policy: Policy,
    requests: Iterable[RouteRequest],
    pool: Sequence[FakeBackend],
    *,
    concurrency: int | None = None,
) -> list[int]:
    """Route ``requests`` in order; return the chosen backend index for each.

    Each pick charges the chosen backend one request and the request's tokens (prompt; for
    a decode leg prompt + max_tokens), as pdlb does. With ``concurrency`` the oldest request
    finishes when more are in flight (refund, then ``on_request_done`` if the policy has
    it); without it nothing finishes. Everything still in flight finishes at the end, so
    the backends are idle again afterwards.
    """
    if concurrency is not None and concurrency < 1:
        raise ValueError("simulate: concurrency must be >= 1")
    hooks = policy if isinstance(policy, PolicyHooks) else None
    inflight: deque[tuple[RouteRequest, FakeBackend]] = deque()
    chosen: list[int] = []

    def finish() -> None:
        request, backend = inflight.popleft()
        backend.inflight_requests -= 1
        backend.inflight_tokens -= request_tokens(request)
        if hooks is not None:
            hooks.on_request_done(request, backend, True, 0.0)

    for request in requests:
        backend = choose(policy, request, pool)
        backend.inflight_requests += 1
        backend.inflight_tokens += request_tokens(request)
        backend.tokens_since_scrape += request_tokens(request)
        backend.picks += 1
        inflight.append((request, backend))
        chosen.append(backend.index)
        while concurrency is not None and len(inflight) > concurrency:
            finish()
    while inflight:
        finish()
    return chosen

