"""The decode's answer, relayed to the client: whole (JSON) or as an SSE stream.

The proxy (lb/proxy.py) decides where a request goes; this module moves the decode's bytes
once a decode backend has been chosen: a JSON answer with its usage stitched, or the stream —
through pdlb's own HTTP client (lb/backends/http1.py: relayed inside the socket callbacks) or
aiohttp's — with only the final usage event parsed, a stalled or broken stream ended with an
in-band error event and ``[DONE]``, and the client's departure turned into closing the decode
connection (which makes vLLM abort the request and free its KV).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

import aiohttp
import orjson
from aiohttp.client_exceptions import ClientConnectionResetError

from lb.backends.http1 import FastClient
from lb.backends.upstream import Upstream
from lb.config import Config
from lb.connectors.base import UNKNOWN_PREFILL, PrefillResult
from lb.errors import PdlbError, UpstreamError, error_payload
from lb.metrics import Metrics
from lb.request import ProxyRequest
from lb.stream.pipe import DRAIN, GONE, PIECE, RAW, SETTLE, Event, Pipe
from lb.stream.port import ClientSide
from lb.stream.relay import DONE_EVENT, SSERelay, rewrite_response_usage, sse_event

log = logging.getLogger("pdlb.proxy")


class PendingPrefill:
    """A concurrent connector's prefill leg, still running while the decode streams."""

    __slots__ = ("responding", "task", "wait_s")

    def __init__(self, task: asyncio.Task[PrefillResult], wait_s: float) -> None:
        self.task = task
        self.wait_s = wait_s
        self.responding = asyncio.Event()
        """Set once the decode's answer started reaching the client: from then on a prefill
        failure no longer matters (the decode has its KV) and nothing is retried."""

    async def settle(self) -> PrefillResult:
        """The prefill's result for usage stitching; if it failed or is too slow, a result
        that knows nothing (stitching then drops the decode's cached-token figure)."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.task), self.wait_s)
        except (PdlbError, TimeoutError):
            return UNKNOWN_PREFILL


class Answer:
    """Relays one decode attempt's answer; raises UpstreamError before the first byte."""

    def __init__(self, config: Config, upstream: Upstream, metrics: Metrics) -> None:
        self.config = config
        self.upstream = upstream
        self.metrics = metrics
        self.timeouts = config.server.timeouts
        self._ttft = {e: metrics.ttft.labels(endpoint=e) for e in ("completions", "chat")}

    async def json(
        self, client: ClientSide, request: ProxyRequest, url: str, body: bytes,
        headers: Mapping[str, str], prefill: PrefillResult | None, started: float,
        pending: PendingPrefill | None,
    ) -> None:
        sent = time.monotonic()
        data = await self.upstream.post_json(
            url, body, headers, timeout_s=self.timeouts.first_byte_s, what=f"decode {url}"
        )
        if pending is not None:
            pending.responding.set()
            prefill = await pending.settle()
        self.metrics.handoff.observe(time.monotonic() - sent)
        self.metrics.decode.observe(time.monotonic() - sent)
        if prefill is not None and rewrite_response_usage(data, prefill):
            self.metrics.usage_rewrites.inc()
        data.pop("kv_transfer_params", None)
        await client.send_json(200, orjson.dumps(data), {"X-Request-Id": request.request_id})
        self._ttft[request.endpoint].observe(time.monotonic() - started)

    async def stream(
        self, client: ClientSide, request: ProxyRequest, url: str, body: bytes,
        headers: Mapping[str, str], prefill: PrefillResult | None, started: float,
        pending: PendingPrefill | None,
    ) -> None:
        fast = self.upstream.fast
        if fast is not None and self.config.server.fast_stream and fast.supports(url):
            return await self._stream_fast(
                fast, client, request, url, body, headers, prefill, started, pending)
        sent = time.monotonic()
        async with self.upstream.open_stream(url, body, headers, what=f"decode {url}") as upstream:
            self.metrics.handoff.observe(time.monotonic() - sent)
            await client.start_stream({"X-Request-Id": request.request_id})
            if pending is not None:
                pending.responding.set()
            relay = SSERelay(prefill) if prefill is not None or pending is not None else None
            first = True
            loop = asyncio.get_running_loop()
            idle = self.timeouts.idle_s
            # Re-arming a timer per chunk costs more than the relay itself; re-arm at most
            # every idle/8, so a stall is detected after between 7/8 and all of idle_s.
            rearm_every = idle / 8
            armed_at = -idle
            done = False
            try:
                async with asyncio.timeout(loop.time() + self.timeouts.first_byte_s) as watchdog:
                    async for data in upstream.content.iter_any():
                        now = loop.time()
                        if now - armed_at > rearm_every:
                            watchdog.reschedule(now + idle)
                            armed_at = now
                        if relay is not None:
                            if pending is not None and relay.prefill is None \
                                    and relay.may_hold_final_usage(data):
                                relay.prefill = await pending.settle()
                            data = relay.feed(data)
                            if not data:
                                continue
                        elif not done and b"data: [DONE]" in data:
                            done = True
                        await client.write(data)
                        if first:
                            first = False
                            self._ttft[request.endpoint].observe(time.monotonic() - started)
                    await _upstream_ended(client, relay, done)
            except (ClientConnectionResetError, ConnectionResetError):
                # The client went away: close (not release) the decode connection so vLLM
                # aborts the request and frees its KV.
                self.metrics.client_disconnects.labels(phase="stream").inc()
                upstream.close()
                return
            except (PdlbError, TimeoutError, OSError, aiohttp.ClientError) as exc:
                await self._stream_failed(client, request, exc, sent)
                return
            finally:
                if relay is not None and relay.rewrites:
                    self.metrics.usage_rewrites.inc()
            await self._end_stream(client)
        self.metrics.decode.observe(time.monotonic() - sent)

    async def _stream_fast(
        self, fast: FastClient, client: ClientSide, request: ProxyRequest, url: str,
        body: bytes, headers: Mapping[str, str], prefill: PrefillResult | None,
        started: float, pending: PendingPrefill | None,
    ) -> None:
        """:meth:`stream` through lb/backends/http1.py: the body is relayed inside the
        socket callbacks; this coroutine wakes only for what needs an await."""
        sent = time.monotonic()
        upstream = await fast.post(url, body, headers, timeout_s=self.timeouts.first_byte_s,
                                   what=f"decode {url}")
        pipe: Pipe | None = None
        relay: SSERelay | None = None
        try:
            self.metrics.handoff.observe(time.monotonic() - sent)
            await client.start_stream({"X-Request-Id": request.request_id})
            if pending is not None:
                pending.responding.set()
            relay = SSERelay(prefill) if prefill is not None or pending is not None else None
            needs_settle = None
            if pending is not None and relay is not None:
                live = relay

                def needs_settle(data: bytes) -> bool:
                    return live.prefill is None and live.may_hold_final_usage(data)

            pipe = Pipe(upstream, relay.feed if relay is not None else None, needs_settle,
                        self.timeouts.first_byte_s, self.timeouts.idle_s)
            pipe.start()
            first = True
            try:
                finished = False
                while not finished:
                    event: Event | None = await pipe.next()
                    while event is not None:
                        kind, value = event
                        event = None
                        if kind == RAW:
                            event = pipe.process(value)
                        elif kind == PIECE:
                            await client.write(value)
                            if first:
                                first = False
                                self._ttft[request.endpoint].observe(time.monotonic() - started)
                                target = client.direct()
                                if target is not None:
                                    pipe.go_direct(*target)
                        elif kind == DRAIN:
                            async with asyncio.timeout(self.timeouts.idle_s):
                                await client.drain()
                        elif kind == SETTLE:
                            assert relay is not None and pending is not None
                            relay.prefill = await pending.settle()
                            event = pipe.process(value)
                        elif kind == GONE:
                            raise ConnectionResetError("the client went away")
                        else:  # END
                            if value is not None:
                                raise value
                            finished = True
                    pipe.unblock_if_idle()
                await _upstream_ended(client, relay, pipe.done_marker)
            except (ClientConnectionResetError, ConnectionResetError):
                # The client went away: close (not release) the decode connection so vLLM
                # aborts the request and frees its KV.
                self.metrics.client_disconnects.labels(phase="stream").inc()
                upstream.close()
                return
            except (PdlbError, TimeoutError, OSError, aiohttp.ClientError) as exc:
                upstream.close()
                await self._stream_failed(client, request, exc, sent)
                return
            await self._end_stream(client)
        finally:
            # A response not read to its end is closed here (cancellation included); one
            # that was is back in the pool already and this does nothing.
            upstream.close()
            if pipe is not None:
                pipe.close()
            if relay is not None and relay.rewrites:
                self.metrics.usage_rewrites.inc()
        self.metrics.decode.observe(time.monotonic() - sent)

    async def _end_stream(self, client: ClientSide) -> None:
        """The terminating chunk; a client that left just before it is not an error."""
        try:
            await client.end()
        except (ClientConnectionResetError, ConnectionResetError):
            self.metrics.client_disconnects.labels(phase="stream_end").inc()

    async def _stream_failed(self, client: ClientSide, request: ProxyRequest,
                             exc: BaseException, sent: float) -> None:
        """The stream broke after the 200 went out: say so in-band, then [DONE]."""
        message, code = _describe_stream_failure(exc)
        log.warning("request %s: %s", request.request_id, message)
        self.metrics.stream_errors.labels(code=code).inc()
        try:
            # Bounded: a client that stopped reading (often why the stream stalled) must
            # not pin the request, its decode lease and its admission ticket for ever.
            async with asyncio.timeout(self.timeouts.idle_s):
                await _finish_with_error(client, message, code)
        except TimeoutError:
            log.warning("request %s: the client is not reading; given up", request.request_id)
            self.metrics.client_disconnects.labels(phase="not_reading").inc()
        self.metrics.decode.observe(time.monotonic() - sent)


async def _upstream_ended(client: ClientSide, relay: SSERelay | None, saw_done: bool) -> None:
    """The decode's body is all in: what the relay held back goes out, and the stream must
    have carried ``[DONE]`` (``saw_done`` tells it when there is no relay)."""
    if relay is not None:
        tail = relay.flush()
        if tail:
            await client.write(tail)
        saw_done = relay.saw_done
    if not saw_done:
        raise UpstreamError("decode stream ended before [DONE]", code="truncated_stream")


def _describe_stream_failure(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, PdlbError):
        return exc.message, exc.code or "upstream_error"
    if isinstance(exc, TimeoutError):
        return "decode stream stalled: no data within the idle timeout", "backend_timeout"
    return f"decode stream failed: {type(exc).__name__}", "backend_connection_lost"


async def _finish_with_error(client: ClientSide, message: str, code: str) -> None:
    """After the 200 went out, the only honest end is an SSE error event, then [DONE]."""
    try:
        await client.write(sse_event(error_payload(message, "upstream_error", code)))
        await client.write(DONE_EVENT)
        await client.end()
    except (ClientConnectionResetError, ConnectionResetError):
        pass
