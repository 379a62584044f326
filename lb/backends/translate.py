"""Transport failures → pdlb's error tree, in one place for both backend clients.

aiohttp's client errors, asyncio timeouts and whatever pdlb's own HTTP/1.1 client reports
when a body is cut all become :mod:`lb.errors` types here, with ``raise ... from exc`` so the
cause stays in the logs. Nothing above ``lb/backends/`` sees a transport's own exceptions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp

from lb.errors import BackendConnectError, BackendTimeout, PdlbError, UpstreamError


def translate(exc: BaseException, what: str) -> PdlbError:
    """The pdlb error for a transport failure of the leg ``what`` (a PdlbError as is)."""
    if isinstance(exc, PdlbError):
        return exc
    if isinstance(exc, TimeoutError):
        return BackendTimeout(f"{what}: timed out", code="backend_timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return BackendConnectError(
            f"{what}: cannot connect ({exc.os_error.strerror or exc.os_error})",
            code="backend_connect_error",
        )
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                        aiohttp.ClientOSError)):
        return BackendConnectError(
            f"{what}: connection lost ({type(exc).__name__})", code="backend_connection_lost"
        )
    if isinstance(exc, aiohttp.ClientResponseError):
        # pdlb neither follows redirects nor calls raise_for_status: this is aiohttp's
        # response parser refusing the bytes (reported as a 400 it made up). The same code
        # pdlb's own client gives a malformed answer.
        return UpstreamError(f"{what}: the backend's answer is not valid HTTP/1.1 ({exc.message})",
                             code="invalid_backend_response")
    if isinstance(exc, aiohttp.ClientError):
        return UpstreamError(f"{what}: {type(exc).__name__}: {exc}", code="backend_error")
    # Anything else that ends a body early (e.g. the HTTP/1.1 client's parser giving up)
    return BackendConnectError(
        f"{what}: connection lost ({type(exc).__name__})", code="backend_connection_lost"
    )


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Raise the pdlb error for any transport failure inside the block."""
    try:
        yield
    except PdlbError:
        raise
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise translate(exc, what) from exc
