"""Client API keys and the admin token: how a presented key is compared.

Keys come from ``[auth] api_keys`` and the ``PDLB_API_KEYS`` environment variable. Every
candidate key is compared in constant time (``hmac.compare_digest``) and all of them are
always compared, so neither the answer's timing nor its content says how close a guess was.
Keys never appear in logs or error messages. Who needs which key is the route table's
(lb/serve/routes.py) and the guard's (lb/serve/guard.py) business.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence


def bearer(authorization: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` value ("" for any other)."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def matches(token: str, keys: Sequence[str]) -> bool:
    given = token.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode())
    return found and bool(token)
