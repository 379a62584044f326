"""The one guard both fronts put around a client's request.

pdlb has two HTTP servers for the same routes (lb/serve/front.py for ordinary completion
requests, aiohttp's for everything else); a client must not be able to tell which one took
its request from anything but the ``Server`` header. So what happens around the proxy is
decided here, once:

* **access**: ``[auth] api_keys`` (every key compared in constant time, lb/serve/auth.py);
  the public and admin paths come from the route table (lb/serve/routes.py);
* **what a completion request may carry**: ``Content-Type`` JSON (or none, or
  ``application/octet-stream``), else 415 ``unsupported_media_type``; no
  ``Content-Encoding`` other than ``identity``, else 415 ``unsupported_content_encoding``
  (neither vLLM nor OpenAI's API takes compressed request bodies, and refusing costs nothing
  where decoding would put a decompression bomb in front of every request);
* **error → answer**: status, the OpenAI-shaped JSON body, the error's headers
  (``Retry-After``...), and whether the connection must close (408 and 413: the rest of the
  body was never read);
* **counting**: ``pdlb_requests{endpoint,status}`` for each completion request answered, and
  status 499 plus ``pdlb_client_disconnects{phase="before_response"}`` when the client left
  before its answer (a stream whose ``[DONE]`` went out is whole: 200, phase ``stream_end``);
* **the body timeout**: the 408 a client gets when its body does not arrive in
  ``body_timeout_s``;
* **the access log**: one line per completion request, after it was counted
  (lb/accesslog.py; formatted only when ``[log] access`` is on).

Each front only moves bytes: it builds a :class:`ServedClient` for the request and runs
:meth:`Guard.serve` (the completion routes), or asks :meth:`Guard.check_access` and
:func:`error_answer` (aiohttp's other routes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import NamedTuple

from lb.accesslog import CLIENT_DISCONNECT, AccessLog, RequestRecord
from lb.config import Config
from lb.errors import InvalidRequest, PdlbError, Unauthorized
from lb.metrics import Metrics
from lb.request import ENDPOINT_PATHS, Endpoint
from lb.serve.auth import bearer, matches
from lb.serve.models import ModelRouter
from lb.serve.routes import access
from lb.stream.port import ClientSide
from lb.tracing import OFF

log = logging.getLogger("pdlb.guard")

_ACCEPTED_TYPES = frozenset({"application/json", "", "application/octet-stream"})
_CLOSING_STATUSES = frozenset({408, 413})


class ErrorAnswer(NamedTuple):
    """An error as it goes on the wire, whichever server writes it."""

    status: int
    body: bytes
    headers: Mapping[str, str]
    close: bool
    """The connection must close after it (the request's body was not read whole)."""


def error_answer(exc: PdlbError) -> ErrorAnswer:
    return ErrorAnswer(exc.status, exc.body(), exc.headers(), exc.status in _CLOSING_STATUSES)


def internal_error() -> PdlbError:
    return PdlbError("internal error in pdlb", code="internal_error")


class ServedClient(ClientSide):
    """A request's client as a front holds it: besides the proxy's port, what it answered
    and how an error reaches it."""

    @property
    @abstractmethod
    def status(self) -> int:
        """The status answered so far (0: none yet)."""

    @abstractmethod
    def peer(self) -> str:
        """The client's address, for the access log (asked only when a line is written)."""

    @abstractmethod
    def send_error(self, answer: ErrorAnswer) -> None:
        """Answer with ``answer``; if an answer has already started, end the connection
        after it instead (nothing honest is left to say on it)."""


class Guard:
    """Access, request checks, errors, counting and body timeouts for both fronts."""

    __slots__ = ("_access", "_api_keys", "_body_timeout_s", "_metrics", "_proxy", "_requests",
                 "_tracing", "observer")

    def __init__(self, config: Config, proxy: ModelRouter, metrics: Metrics) -> None:
        self._api_keys = tuple(config.auth.api_keys)
        self._body_timeout_s = config.server.body_timeout_s
        self._proxy = proxy
        self._metrics = metrics
        self._requests = metrics.requests
        self._access = AccessLog(config.log.access, config.log.format)
        self._tracing = OFF if proxy is None else proxy.tracing
        self.observer: Callable[[RequestRecord, int], None] | None = None
        """Sees every finished request's record (``[planner]``, lb/planner/online.py)."""

    @property
    def body_timeout_s(self) -> float:
        return self._body_timeout_s

    # -- checks
    def check_key(self, authorization: str | None) -> None:
        """Raise 401 unless API keys are off or ``authorization`` carries one of them."""
        if self._api_keys and not matches(bearer(authorization or ""), self._api_keys):
            raise Unauthorized("missing or invalid API key: send Authorization: Bearer <key>",
                               code="invalid_api_key")

    def check_access(self, path: str, authorization: str | None) -> None:
        """For any route: keys where the route table asks for one (admin routes check
        their own token)."""
        if access(path) == "key":
            self.check_key(authorization)

    def check_completion(self, headers: Mapping[str, str]) -> None:
        """What a completion request must satisfy before the proxy sees it (headers as
        :attr:`ClientSide.headers`: lower-case names, first value of a repeated one)."""
        if self._api_keys:
            self.check_key(headers.get("authorization"))
        ctype = headers.get("content-type")
        if ctype is not None:
            mime = ctype.split(";", 1)[0].strip().lower()
            if mime not in _ACCEPTED_TYPES:
                raise InvalidRequest(f"Content-Type must be application/json, got {mime}",
                                     code="unsupported_media_type", status=415)
        coding = headers.get("content-encoding")
        if coding is not None and coding.strip().lower() not in ("identity", ""):
            raise _UnsupportedEncoding(coding)

    def body_timeout(self) -> PdlbError:
        """The 408 of a body that did not arrive within ``body_timeout_s``."""
        return InvalidRequest(f"request body not received within {self._body_timeout_s:g} s",
                              status=408, code="body_timeout")

    # -- counting
    def count(self, endpoint: Endpoint, status: int) -> None:
        self._requests.labels(endpoint=endpoint, status=str(status)).inc()

    def answered_early(self, client: ServedClient, endpoint: Endpoint, error: PdlbError,
                       waited_s: float) -> None:
        """An error a front answers before :meth:`serve` could start (the fast front's 408
        for a body that never came, ``waited_s`` after its head): answered, counted and
        logged as :meth:`serve` would."""
        record = client.record = RequestRecord(time.monotonic() - waited_s)
        record.reason = error.code
        client.send_error(error_answer(error))
        self.count(endpoint, error.status)
        self._log(client, record, endpoint, error.status)

    # -- a completion request, start to end
    async def serve(self, client: ServedClient, endpoint: Endpoint,
                    done: Callable[[], None] | None = None) -> None:
        """Check the request, run the proxy, answer any error, count the outcome; then
        ``done()`` (the front's connection bookkeeping, without a coroutine of its own).
        A client that leaves (cancellation) is counted as 499 and the cancellation goes on.
        Last, the access line (a client that left mid-stream is logged as 499)."""
        record = client.record = RequestRecord(time.monotonic())
        path = ENDPOINT_PATHS[endpoint]
        try:
            with self._tracing.request(path, endpoint, client.headers):
                try:
                    self.check_completion(client.headers)
                    await self._proxy.handle(client, endpoint)
                except PdlbError as exc:
                    if exc.status >= 500:
                        log.warning("POST %s -> %d: %s", ENDPOINT_PATHS[endpoint], exc.status,
                                    exc.message)
                    record.reason = exc.code
                    answer = error_answer(exc)
                    if client.answer_headers is not None:  # [tenants]: x-ratelimit-*
                        answer = answer._replace(headers={**client.answer_headers,
                                                          **answer.headers})
                    client.send_error(answer)
                except asyncio.CancelledError:
                    if record.delivered:  # it read [DONE], left before the last chunk: 200
                        self._metrics.client_disconnects.labels(phase="stream_end").inc()
                        self.count(endpoint, client.status)
                        self._log(client, record, endpoint, client.status)
                        raise
                    self._metrics.client_disconnects.labels(phase="before_response").inc()
                    self.count(endpoint, 499)
                    record.reason = CLIENT_DISCONNECT
                    self._log(client, record, endpoint, 499)
                    raise
                except Exception:
                    log.exception("unhandled error on POST %s", ENDPOINT_PATHS[endpoint])
                    record.reason = "internal_error"
                    client.send_error(error_answer(internal_error()))
                status = client.status
                self._requests.labels(endpoint=endpoint, status=str(status)).inc()
                self._proxy.count(record.model, endpoint, status)
                self._log(client, record, endpoint,
                          499 if record.reason == CLIENT_DISCONNECT else status)
        finally:
            if done is not None:
                done()

    def _log(self, client: ServedClient, record: RequestRecord, endpoint: Endpoint,
             status: int) -> None:
        self._tracing.finish(record, status)
        if self.observer is not None:
            self.observer(record, status)
        if self._access.enabled:
            self._access.emit(record, client=client.peer(), endpoint=endpoint, status=status)


class _UnsupportedEncoding(InvalidRequest):
    """415 with ``Accept-Encoding: identity`` (RFC 7694): what the client may send instead."""

    def __init__(self, coding: str) -> None:
        super().__init__(f"Content-Encoding {coding.strip()!r} is not supported: send the "
                         "request body uncompressed", code="unsupported_content_encoding",
                         status=415)

    def headers(self) -> dict[str, str]:
        return {"Accept-Encoding": "identity"}
