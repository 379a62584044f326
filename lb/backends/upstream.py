"""Talking to backends: the one facade over pdlb's two HTTP clients.

pdlb calls a backend two ways: a POST whose JSON answer is read whole (prefill, non-streamed
decode, health, models) and a POST whose body is relayed as it arrives (the streamed decode);
the pass-through routes (lb/serve/passthrough.py) also take an answer whole, any status.
Both go through :class:`Upstream`, which picks the client — pdlb's own HTTP/1.1 client
(lb/backends/http1.py, relaying inside the socket callbacks) for plain ``http://`` backends
when ``[server] fast_stream`` is on, aiohttp's otherwise — and translates every transport
failure into lb.errors (lb/backends/translate.py). Callers never see which client served.

Creating a ClientSession per request is the classic mistake of this field's proxies (a new
connection pool, TCP + maybe TLS handshakes inside TTFT). pdlb opens one session per app with
keep-alive pools per backend and closes it at shutdown.

A stream that is abandoned before its end (client gone, timeout, error) is *closed*, not
released: closing the decode connection is what makes vLLM abort the request and free the
KV the prefill is holding for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, NamedTuple, Protocol

import aiohttp
import orjson

from lb.backends.aiohttp_body import AiohttpStream
from lb.backends.http1 import FastClient, FastResponse, http_error
from lb.backends.translate import translate, translate_errors
from lb.config import TimeoutsConfig
from lb.errors import BackendHTTPError, UpstreamError


class BodySource(Protocol):
    """A backend response's body, delivered piece by piece through callbacks."""

    def start(self, on_data: Callable[[bytes], None],
              on_end: Callable[[BaseException | None], None]) -> None:
        """Deliver each body piece to ``on_data``, then ``on_end(None | error)``; the error
        is an lb.errors type. ``on_data`` may call :meth:`pause` and :meth:`close`."""

    def pause(self) -> None:
        """Stop reading from the backend (the client is slow, or an await is pending)."""

    def resume(self) -> None:
        """Read again."""

    def close(self) -> None:
        """Abandon the response: its connection is closed unless already released; no
        callback follows."""


class BackendStream(BodySource, Protocol):
    """A streamed answer whose head arrived with a status below 400, and its body."""

    status: int
    headers: Mapping[str, str]
    """Response headers (look names up in lower case)."""


class _Http1Stream:
    """A response of the HTTP/1.1 client as a :class:`BackendStream`: pieces go to ``on_data``
    untouched (inside ``data_received``); only the end is wrapped, to translate its error and
    to keep it from following a :meth:`close`."""

    __slots__ = ("_closed", "_response", "_what", "headers", "status")

    def __init__(self, response: FastResponse, what: str) -> None:
        self._response = response
        self._what = what
        self._closed = False
        self.status: int = response.status
        self.headers: Mapping[str, str] = response.headers

    def start(self, on_data: Callable[[bytes], None],
              on_end: Callable[[BaseException | None], None]) -> None:
        what = self._what

        def ended(error: BaseException | None) -> None:
            if not self._closed:
                on_end(None if error is None else translate(error, what))

        self._response.start(on_data, ended)

    def pause(self) -> None:
        self._response.pause()

    def resume(self) -> None:
        self._response.resume()

    def close(self) -> None:
        self._closed = True
        self._response.close()


class WholeAnswer(NamedTuple):
    """A backend's answer read whole, whatever its status (the pass-through routes)."""

    status: int
    content_type: str
    """The ``Content-Type`` header as sent ("" when absent)."""
    body: bytes


class OpenAnswer(NamedTuple):
    """A backend's answer whose head arrived, any status; its body comes as it arrives."""

    status: int
    content_type: str
    chunks: AsyncIterator[bytes]
    """The body, piece by piece; each wait is bounded by the idle timeout (lb.errors)."""


async def _chunks(resp: aiohttp.ClientResponse, idle_s: float, what: str
                  ) -> AsyncIterator[bytes]:
    while True:
        with translate_errors(what):
            async with asyncio.timeout(idle_s):
                chunk = await resp.content.readany()
        if not chunk:
            return
        yield chunk


async def _error_from_response(resp: aiohttp.ClientResponse, what: str) -> BackendHTTPError:
    body = await resp.read()
    return http_error(resp.status, body, resp.content_type, what)


class Upstream:
    """The app's backend clients and the two ways pdlb calls a backend."""

    def __init__(self, timeouts: TimeoutsConfig, *, fast: bool = False) -> None:
        self.timeouts = timeouts
        self.fast = fast
        """Plain ``http://`` POST legs (JSON and streams) through pdlb's HTTP/1.1 client
        (``[server] fast_stream``); aiohttp's otherwise, and always for GETs."""
        self._session: aiohttp.ClientSession | None = None
        self._http1: FastClient | None = None

    async def start(self) -> None:
        self._http1 = FastClient(self.timeouts.connect_s)
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
        if self._http1 is not None:
            self._http1.close()
            self._http1 = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Upstream.start() was not called")
        return self._session

    def _http1_for(self, url: str) -> FastClient | None:
        """The HTTP/1.1 client when it serves ``url``; None: aiohttp's session does."""
        client = self._http1
        if self.fast and client is not None and client.supports(url):
            return client
        return None

    async def post_json(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout_s: float, what: str
    ) -> dict[str, Any]:
        """POST a JSON body and return the decoded JSON object; any error status raises."""
        http1 = self._http1_for(url)
        if http1 is not None:
            raw = await http1.post_read(url, body, headers, timeout_s=timeout_s, what=what)
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

    async def open_stream(
        self, url: str, body: bytes, headers: Mapping[str, str], *, what: str
    ) -> BackendStream:
        """POST and return the answer once its head arrived (within ``first_byte_s``).

        A 4xx/5xx raises :class:`BackendHTTPError` with the backend's body; transport
        failures raise lb.errors. The caller owns the stream from here: it must
        :meth:`~BodySource.close` it on any exit (a no-op once the body was read to its end,
        when the connection is already back in its pool).
        """
        http1 = self._http1_for(url)
        if http1 is not None:
            response = await http1.post(url, body, headers,
                                        timeout_s=self.timeouts.first_byte_s, what=what)
            return _Http1Stream(response, what)
        with translate_errors(what):
            async with asyncio.timeout(self.timeouts.first_byte_s):
                resp = await self.session.post(url, data=body, headers=headers)
                try:
                    if resp.status >= 400:
                        raise await _error_from_response(resp, what)
                except BaseException:
                    resp.close()
                    raise
        return AiohttpStream(resp, what)

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

    @contextlib.asynccontextmanager
    async def request_open(
        self, url: str, body: bytes, headers: Mapping[str, str], *, what: str,
    ) -> AsyncIterator[OpenAnswer]:
        """POST; the answer once its head arrived (within ``first_byte_s``), any status, its
        body relayed as it comes (each read within ``idle_s``) — a pass-through route whose
        answer may be a stream. Leaving the block closes the connection unless the body was
        read to its end: an abandoned vLLM stream is aborted, not left generating."""
        with translate_errors(what):
            async with asyncio.timeout(self.timeouts.first_byte_s):
                resp = await self.session.post(url, data=body, headers=headers)
        try:
            yield OpenAnswer(resp.status, resp.headers.get("Content-Type", ""),
                             _chunks(resp, self.timeouts.idle_s, what))
        finally:
            if resp.content.at_eof():
                resp.release()
            else:
                resp.close()

    async def request_whole(
        self, method: str, url: str, body: bytes | None, headers: Mapping[str, str], *,
        timeout_s: float, what: str,
    ) -> WholeAnswer:
        """One request whose answer is read whole and returned as it came, error statuses
        included (the pass-through routes hand a backend's 4xx to the client untouched);
        only transport failures raise (lb.errors, within ``timeout_s`` in all)."""
        with translate_errors(what):
            async with asyncio.timeout(timeout_s):
                async with self.session.request(method, url, data=body,
                                                headers=headers) as resp:
                    return WholeAnswer(resp.status, resp.headers.get("Content-Type", ""),
                                       await resp.read())
