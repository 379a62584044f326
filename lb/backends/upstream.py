"""Talking to backends: one shared aiohttp session, and transport errors → lb.errors in one place.

Creating a ClientSession per request is the classic mistake of this field's proxies (a new
connection pool, TCP + maybe TLS handshakes inside TTFT). pdlb opens one session per app with
keep-alive pools per backend and closes it at shutdown.

A response that is abandoned before its end (client gone, timeout, error) is *closed*, not
released: closing the decode connection is what makes vLLM abort the request and free the
KV the prefill is holding for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Protocol

import aiohttp
import orjson

from lb.backends.http1 import FastClient, http_error
from lb.config import TimeoutsConfig
from lb.errors import (
    BackendConnectError,
    BackendHTTPError,
    BackendTimeout,
    PdlbError,
    UpstreamError,
)

log = logging.getLogger("pdlb.upstream")


class BodySource(Protocol):
    """A backend response's body, delivered piece by piece inside the socket callbacks."""

    def start(self, on_data: Callable[[bytes], None],
              on_end: Callable[[BaseException | None], None]) -> None:
        """Deliver each body piece to ``on_data``, then ``on_end(None | error)``."""

    def pause(self) -> None:
        """Stop reading from the backend (the client is slow, or an await is pending)."""

    def resume(self) -> None:
        """Read again."""

    def close(self) -> None:
        """Abandon the response: its connection is closed unless already released."""


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Map aiohttp/asyncio transport failures to pdlb's error tree; ``what`` names the leg."""
    try:
        yield
    except PdlbError:
        raise
    except TimeoutError as exc:
        raise BackendTimeout(f"{what}: timed out", code="backend_timeout") from exc
    except aiohttp.ClientConnectorError as exc:
        raise BackendConnectError(
            f"{what}: cannot connect ({exc.os_error.strerror or exc.os_error})",
            code="backend_connect_error",
        ) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
            aiohttp.ClientOSError) as exc:
        raise BackendConnectError(
            f"{what}: connection lost ({type(exc).__name__})", code="backend_connection_lost"
        ) from exc
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"{what}: {type(exc).__name__}: {exc}", code="backend_error") from exc


async def _error_from_response(resp: aiohttp.ClientResponse, what: str) -> BackendHTTPError:
    body = await resp.read()
    return http_error(resp.status, body, resp.content_type, what)


class Upstream:
    """The app's single client session and the two ways pdlb calls a backend."""

    def __init__(self, timeouts: TimeoutsConfig, *, fast_json: bool = False) -> None:
        self.timeouts = timeouts
        self.fast_json = fast_json
        """POST legs with a JSON answer (prefill, non-streamed decode) through :attr:`fast`."""
        self._session: aiohttp.ClientSession | None = None
        self.fast: FastClient | None = None
        """The raw HTTP/1.1 client of the streamed decode leg (``[server] fast_stream``)."""

    async def start(self) -> None:
        self.fast = FastClient(self.timeouts.connect_s)
        connector = aiohttp.TCPConnector(
            limit=0,  # admission control bounds concurrency, not the pool
            ttl_dns_cache=300,
            keepalive_timeout=30,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect_s),
            json_serialize=lambda o: orjson.dumps(o).decode(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self.fast is not None:
            self.fast.close()
            self.fast = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Upstream.start() was not called")
        return self._session

    async def post_json(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout_s: float, what: str
    ) -> dict[str, Any]:
        """POST a JSON body and return the decoded JSON object; any error status raises."""
        fast = self.fast
        if self.fast_json and fast is not None and fast.supports(url):
            raw = await fast.post_read(url, body, headers, timeout_s=timeout_s, what=what)
        else:
            with translate_errors(what):
                async with asyncio.timeout(timeout_s):
                    async with self.session.post(url, data=body, headers=headers) as resp:
                        if resp.status >= 400:
                            raise await _error_from_response(resp, what)
                        raw = await resp.read()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError(
                f"{what}: backend answered invalid JSON", code="invalid_backend_response"
            ) from exc
        if not isinstance(data, dict):
            raise UpstreamError(
                f"{what}: backend answered a non-object", code="invalid_backend_response"
            )
        return data

    @asynccontextmanager
    async def open_stream(
        self, url: str, body: bytes, headers: Mapping[str, str], *, what: str
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST and yield the response once its headers arrived (within first_byte_s).

        The body is left to the caller to read. On any exit but a fully read body the
        connection is closed, which aborts the request on the backend.
        """
        with translate_errors(what):
            async with asyncio.timeout(self.timeouts.first_byte_s):
                resp = await self.session.post(url, data=body, headers=headers)
            try:
                if resp.status >= 400:
                    raise await _error_from_response(resp, what)
            except BaseException:
                resp.close()
                raise
        try:
            yield resp
        except BaseException:
            resp.close()
            raise
        finally:
            resp.release()

    async def get_json(self, url: str, *, timeout_s: float) -> Any:
        """GET a JSON document (health, models); raises lb.errors on any failure."""
        with translate_errors(f"GET {url}"):
            async with asyncio.timeout(timeout_s):
                async with self.session.get(url) as resp:
                    if resp.status >= 400:
                        raise await _error_from_response(resp, f"GET {url}")
                    return orjson.loads(await resp.read())

    async def get_text(self, url: str, *, timeout_s: float) -> tuple[int, str]:
        with translate_errors(f"GET {url}"):
            async with asyncio.timeout(timeout_s):
                async with self.session.get(url) as resp:
                    return resp.status, await resp.text()
