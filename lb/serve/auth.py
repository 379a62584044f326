"""Client API keys and the admin token: who may talk to pdlb at all.

Keys come from ``[auth] api_keys`` and the ``PDLB_API_KEYS`` environment variable. Every
candidate key is compared in constant time (``hmac.compare_digest``) and all of them are
always compared, so neither the answer's timing nor its content says how close a guess was.
Keys never appear in logs or error messages.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from lb.errors import Unauthorized

# Open without a key: probes and scrapers must work for load balancers and Prometheus.
PUBLIC_PATHS = frozenset({"/health", "/metrics"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bearer(request: web.Request) -> str:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def matches(token: str, keys: Sequence[str]) -> bool:
    given = token.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode())
    return found and bool(token)


def client_auth_middleware(keys: Sequence[str]) -> Callable[[web.Request, Handler],
                                                             Awaitable[web.StreamResponse]]:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        public = request.path in PUBLIC_PATHS or request.path.startswith("/admin/")
        if not public and not matches(bearer(request), keys):
            raise Unauthorized(
                "missing or invalid API key: send Authorization: Bearer <key>",
                code="invalid_api_key",
            )
        return await handler(request)

    return check
