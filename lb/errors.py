"""The one error tree of pdlb, and its translation to OpenAI-shaped JSON.

Every failure a client can see is a :class:`PdlbError`. Lower-level errors (the backend
clients' transport errors, timeouts, bad JSON) are translated into these in one place each
(``lb/backends/translate.py`` for transport, ``lb/request.py`` for input), with ``raise ...
from exc`` so the cause stays in logs. The fronts in ``lb/serve/`` (aiohttp's and the fast
one) turn any :class:`PdlbError` into a response: its ``status``, :meth:`PdlbError.body` and
:meth:`PdlbError.headers`.

Tree::

    PdlbError                          500 internal_error
    ├── InvalidRequest (ValueError)    400 invalid_request_error
    ├── Unauthorized                   401 authentication_error
    ├── NotFound                       404 not_found_error
    ├── PayloadTooLarge                413 invalid_request_error
    ├── Overloaded                     429/503 + Retry-After, names the saturated stage
    ├── UpstreamError                  backend failures
    │   ├── BackendUnavailable         503 no usable backend in a pool
    │   ├── BackendConnectError        502 connection refused / reset
    │   ├── BackendTimeout             504
    │   ├── BackendHTTPError           the backend's own status and body, passed through
    │   └── PrefillFailed              502 the prefill leg gave nothing usable (e.g. no
    │                                  kv_transfer_params); ``reason`` is a metric label
    └── ConfigError (ValueError)       start-up only: names file, key and value
"""

from __future__ import annotations

from typing import Any

import orjson


class PdlbError(Exception):
    """Base of every error pdlb reports; carries its HTTP status and OpenAI error type."""

    status: int = 500
    error_type: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status

    def headers(self) -> dict[str, str]:
        """Extra response headers (e.g. Retry-After); none by default."""
        return {}

    def body(self) -> bytes:
        """The OpenAI-shaped error body: ``{"error": {message, type, param, code}}``."""
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.error_type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )


class InvalidRequest(PdlbError, ValueError):
    status = 400
    error_type = "invalid_request_error"


class Unauthorized(PdlbError):
    status = 401
    error_type = "authentication_error"


class NotFound(PdlbError):
    status = 404
    error_type = "not_found_error"


class PayloadTooLarge(PdlbError):
    status = 413
    error_type = "invalid_request_error"


class Overloaded(PdlbError):
    """A stage is saturated: 429 when the wait queue is full, 503 when waiting timed out."""

    error_type = "overloaded_error"

    def __init__(self, message: str, *, stage: str, reason: str, status: int, retry_after_s: float):
        super().__init__(message, code=reason, status=status)
        self.stage = stage
        self.reason = reason
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {
            "Retry-After": str(max(1, round(self.retry_after_s))),
            "X-Pdlb-Reject-Reason": self.reason,
            "X-Pdlb-Saturated-Stage": self.stage,
        }


class UpstreamError(PdlbError):
    status = 502
    error_type = "upstream_error"


class BackendUnavailable(UpstreamError):
    status = 503
    error_type = "service_unavailable"


class BackendConnectError(UpstreamError):
    status = 502


class BackendTimeout(UpstreamError):
    status = 504
    error_type = "timeout_error"


class BackendHTTPError(UpstreamError):
    """A backend answered with an error status; its body is passed to the client as is."""

    def __init__(self, message: str, *, status: int, raw_body: bytes, content_type: str):
        super().__init__(message, status=status)
        self.raw_body = raw_body
        self.content_type = content_type

    def body(self) -> bytes:
        if self.content_type.startswith("application/json") and self.raw_body:
            return self.raw_body
        return super().body()


class PrefillFailed(UpstreamError):
    """The prefill leg answered but gave nothing the decode leg can use."""

    def __init__(self, message: str, *, reason: str):
        super().__init__(message, code=reason)
        self.reason = reason


class ConfigError(PdlbError, ValueError):
    """A bad or missing configuration; the message names the file, the key and the value."""


def error_payload(message: str, error_type: str, code: str | None = None) -> dict[str, Any]:
    """The ``error`` object as a dict, for SSE error events sent after a stream started."""
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}
