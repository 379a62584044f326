"""The one route table: every path pdlb serves, its method, and who may call it.

Both fronts read it: aiohttp's app registers its handlers from :data:`ROUTES`
(lb/serve/app.py), the fast front recognises the completion routes by
:data:`COMPLETION_PATHS` (lb/serve/requesthead.py), and the guard (lb/serve/guard.py)
decides access by :func:`access`. The completion paths themselves come from
``lb.request.ENDPOINT_PATHS``, below the serve wing, because the proxy sends the same paths
to the backends. The pass-through routes (a ``pool``: one backend of that pool answers,
lb/serve/passthrough.py) are vLLM's own paths, forwarded as they are; docs/api.md says why
each route is served the way it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from lb.request import ENDPOINT_PATHS, Endpoint

Access = Literal["key", "public", "admin"]
"""``key``: a client API key when ``[auth] api_keys`` is set; ``public``: anyone (probes,
Prometheus); ``admin``: the admin token, checked by the admin handlers themselves."""

ADMIN_PREFIX = "/admin/"


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    name: str
    """The handler's name in lb/serve/app.py (the endpoint, for completion routes)."""
    access: Access
    endpoint: Endpoint | None = None
    """For a completion route: the proxy's endpoint and the ``endpoint`` metric label."""
    pool: str | None = None
    """For a pass-through route: the pool one of whose backends answers it (no PD hop);
    ``name`` is its ``endpoint`` metric label."""
    streams: bool = False
    """For a pass-through route: the backend may answer with an SSE stream, relayed to the
    client as it comes (any other answer is still read whole)."""


def _passthrough(path: str, name: str, pool: str, streams: bool = False) -> Route:
    return Route("POST", path, name, "key", pool=pool, streams=streams)


ROUTES: tuple[Route, ...] = (
    *(Route("POST", path, endpoint, "key", endpoint)
      for endpoint, path in ENDPOINT_PATHS.items()),
    Route("GET", "/v1/models", "models", "key"),
    # Same tokenizer on every backend: the prefill pool's, whose work is shortest.
    _passthrough("/tokenize", "tokenize", "prefill"),
    _passthrough("/detokenize", "detokenize", "prefill"),
    # Pooling models produce no KV for a later decode: served whole where requests end.
    _passthrough("/v1/embeddings", "embeddings", "decode"),
    _passthrough("/v2/embed", "embeddings", "decode"),
    _passthrough("/pooling", "pooling", "decode"),
    _passthrough("/classify", "classify", "decode"),
    _passthrough("/score", "score", "decode"),
    _passthrough("/v1/score", "score", "decode"),
    _passthrough("/rerank", "rerank", "decode"),
    _passthrough("/v1/rerank", "rerank", "decode"),
    _passthrough("/v2/rerank", "rerank", "decode"),
    # vLLM 0.32 takes kv_transfer_params on /v1/responses too, but pdlb's PD path does not
    # speak its request and event shapes yet: the decode pool answers it alone (docs/api.md).
    _passthrough("/v1/responses", "responses", "decode", streams=True),
    Route("GET", "/version", "version", "key"),
    Route("GET", "/health", "health", "public"),
    Route("GET", "/health/live", "health_live", "public"),
    Route("GET", "/health/ready", "health_ready", "public"),
    Route("GET", "/metrics", "metrics", "public"),
    Route("POST", ADMIN_PREFIX + "reload", "admin_reload", "admin"),
    Route("GET", ADMIN_PREFIX + "state", "admin_state", "admin"),
    Route("POST", ADMIN_PREFIX + "kv/lookup", "admin_kv_lookup", "admin"),
)

COMPLETION_PATHS: Mapping[str, Endpoint] = {
    r.path: r.endpoint for r in ROUTES if r.endpoint is not None}
"""Path → endpoint of the routes served by the proxy (``POST``)."""

GUARDED_PATHS: frozenset[str] = frozenset(
    [*COMPLETION_PATHS, *(r.path for r in ROUTES if r.pool is not None)])
"""The ``POST`` routes whose handler runs the guard's checks itself (and counts their
refusals): the completions and the pass-through routes."""

_ACCESS: Mapping[str, Access] = {r.path: r.access for r in ROUTES}


def access(path: str) -> Access:
    """Who may call ``path``. Unknown paths need a key (a client without one learns nothing,
    not even that the path does not exist); unknown admin paths are the admin's 404."""
    found = _ACCESS.get(path)
    if found is not None:
        return found
    return "admin" if path.startswith(ADMIN_PREFIX) else "key"


def named(*names: str) -> tuple[Route, ...]:
    """The routes with these handler names, in table order."""
    return tuple(r for r in ROUTES if r.name in names)
