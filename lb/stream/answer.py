"""The decode's answer, relayed to the client: whole (JSON) or as an SSE stream.

The proxy (lb/proxy.py) decides where a request goes; this module moves the decode's bytes
once a decode backend has been chosen: a JSON answer with its usage stitched, or the stream —
relayed by the one loop of lb/stream/pipe.py whichever client lb/backends/upstream.py used —
with only the final usage event parsed, a stalled or broken stream either handed to the
proxy for a continuation (:class:`~lb.migration.StreamBroken`, docs/migration.md) or ended
with an in-band error event and ``[DONE]``, and the client's departure turned into closing
the decode connection (which makes vLLM abort the request and free its KV).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson

from lb.accesslog import CLIENT_DISCONNECT
from lb.backends.upstream import Upstream
from lb.config import Config
from lb.connectors.base import UNKNOWN_PREFILL, PrefillResult
from lb.errors import PdlbError, error_payload
from lb.metrics import Metrics
from lb.migration import StreamBroken, Transcript
from lb.request import ProxyRequest
from lb.stream.pipe import Pipe
from lb.stream.port import ClientSide
from lb.stream.relay import (
    DONE_EVENT,
    SSERelay,
    rewrite_response_usage,
    sse_event,
    stitch_usage,
)
from lb.stream.resume import RecordingRelay, ResumeRelay

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
        record = client.record
        record.handoff_s = record.decode_s = took = time.monotonic() - sent
        self.metrics.handoff.observe(took)
        self.metrics.decode.observe(took)
        if prefill is not None and rewrite_response_usage(data, prefill):
            self.metrics.usage_rewrites.inc()
        data.pop("kv_transfer_params", None)
        usage = data.get("usage")
        if isinstance(usage, dict):
            record.usage = usage
        extra = client.answer_headers
        await client.send_json(200, orjson.dumps(data), {"X-Request-Id": request.request_id}
                               if extra is None else {"X-Request-Id": request.request_id, **extra})
        record.ttft_s = ttft = time.monotonic() - started
        self._ttft[request.endpoint].observe(ttft)

    async def stream(
        self, client: ClientSide, request: ProxyRequest, url: str, body: bytes,
        headers: Mapping[str, str], prefill: PrefillResult | None, started: float,
        pending: PendingPrefill | None,
    ) -> None:
        sent = time.monotonic()
        decode = await self.upstream.open_stream(url, body, headers, what=f"decode {url}")
        transcript = request.transcript
        resumed = transcript is not None and transcript.started
        relay = _relay(prefill, transcript)
        record = client.record
        try:
            record.handoff_s = handoff = time.monotonic() - sent
            self.metrics.handoff.observe(handoff)
            if not resumed:
                extra = client.answer_headers
                await client.start_stream({"X-Request-Id": request.request_id} if extra is None
                                          else {"X-Request-Id": request.request_id, **extra})
                if transcript is not None:
                    transcript.started = True  # the 200 is committed: a break migrates
            if pending is not None:
                pending.responding.set()
            pipe = Pipe(decode, relay, pending.settle if pending is not None else None,
                        self.timeouts.first_byte_s, self.timeouts.idle_s)
            ttft = self._ttft[request.endpoint]

            def first_byte() -> None:
                if resumed:
                    assert transcript is not None
                    self.metrics.migration_lost.observe(time.monotonic() - transcript.broke_at)
                    self.metrics.migrations.labels(outcome="migrated").inc()
                    if record.ttft_s is not None:
                        return  # else the first leg broke before its first byte
                record.ttft_s = took = time.monotonic() - started
                ttft.observe(took)

            try:
                await pipe.run(client, first_byte)
            except ConnectionResetError:  # aiohttp's ClientConnectionResetError included
                # The client went away: the decode connection is closed (not released) below,
                # so vLLM aborts the request and frees its KV.
                self.metrics.client_disconnects.labels(phase="stream").inc()
                record.reason = CLIENT_DISCONNECT
                return
            except (PdlbError, TimeoutError, OSError) as exc:
                decode.close()  # before telling the client: the backend stops at once
                if transcript is not None and transcript.started:
                    self._broken(transcript, pending)
                    raise StreamBroken(exc) from exc
                await self._stream_failed(client, request, exc, sent)
                return
            await self._end_stream(client)
        finally:
            # A body not read to its end is closed here (cancellation included); one that
            # was is back in its pool already and this does nothing.
            decode.close()
            record.delivered = relay.saw_done
            if relay.rewrites:
                self.metrics.usage_rewrites.inc()
                record.usage = relay.usage
        record.decode_s = took = time.monotonic() - sent
        self.metrics.decode.observe(took)

    def _broken(self, transcript: Transcript, pending: PendingPrefill | None) -> None:
        """The first leg's prefill for the usage (a concurrent one only if it is done)."""
        transcript.broke_at = time.monotonic()
        if transcript.attempts == 0 and pending is not None and transcript.prefill is None:
            task = pending.task
            if task.done() and not task.cancelled() and task.exception() is None:
                transcript.prefill = task.result()
                if transcript.prefill.prompt_tokens is not None:
                    transcript.prompt_tokens = transcript.prefill.prompt_tokens

    async def fail_stream(self, client: ClientSide, request: ProxyRequest,
                          exc: BaseException) -> None:
        """A migrating stream that cannot go on: today's in-band error and [DONE]."""
        await self._stream_failed(client, request, exc, time.monotonic())

    async def finish_stream(self, client: ClientSide, transcript: Transcript,
                            include_usage: bool) -> None:
        """A stream that broke after its last token: the usage it still owed, and [DONE]."""
        try:
            async with asyncio.timeout(self.timeouts.idle_s):
                if include_usage and not transcript.usage_sent:
                    usage = finished_usage(transcript)
                    await client.write(sse_event({
                        "id": transcript.id, "object": _OBJECT[transcript.chat],
                        "created": transcript.created, "model": transcript.model,
                        "choices": [], "usage": usage}))
                    client.record.usage = usage
                await client.write(DONE_EVENT)
                await client.end()
            client.record.delivered = True
        except (ConnectionResetError, TimeoutError):
            self.metrics.client_disconnects.labels(phase="stream_end").inc()

    async def _end_stream(self, client: ClientSide) -> None:
        """The terminating chunk; a client that left just before it is not an error."""
        try:
            await client.end()
        except ConnectionResetError:
            self.metrics.client_disconnects.labels(phase="stream_end").inc()

    async def _stream_failed(self, client: ClientSide, request: ProxyRequest,
                             exc: BaseException, sent: float) -> None:
        """The stream broke after the 200 went out: say so in-band, then [DONE]."""
        message, code = _describe_stream_failure(exc)
        log.warning("request %s: %s", request.request_id, message)
        self.metrics.stream_errors.labels(code=code).inc()
        client.record.reason = code
        try:
            # Bounded: a client that stopped reading (often why the stream stalled) must
            # not pin the request, its decode lease and its admission ticket for ever.
            async with asyncio.timeout(self.timeouts.idle_s):
                await _finish_with_error(client, message, code)
        except TimeoutError:
            log.warning("request %s: the client is not reading; given up", request.request_id)
            self.metrics.client_disconnects.labels(phase="not_reading").inc()
        client.record.decode_s = took = time.monotonic() - sent
        self.metrics.decode.observe(took)


_OBJECT = {True: "chat.completion.chunk", False: "text_completion"}


def _relay(prefill: PrefillResult | None, transcript: Transcript | None) -> SSERelay:
    """The leg's relay: plain, recording (a first leg that may migrate), or resuming."""
    if transcript is None or transcript.refused is not None:
        return SSERelay(prefill)
    if transcript.started:
        return ResumeRelay(transcript)
    if prefill is not None:
        transcript.prefill = prefill
        if prefill.prompt_tokens is not None:
            transcript.prompt_tokens = prefill.prompt_tokens
    return RecordingRelay(prefill, transcript)


def finished_usage(t: Transcript) -> dict[str, Any]:
    """The usage of a stream whose every token reached the client before it broke."""
    usage: dict[str, Any] = {"prompt_tokens": t.prompt_tokens or 0,
                             "completion_tokens": t.generated}
    if t.prefill is not None:
        usage = stitch_usage(usage, t.prefill)
    usage["prompt_tokens"] = prompt = t.prompt_tokens or 0
    usage["total_tokens"] = prompt + t.generated
    return usage


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
    except ConnectionResetError:
        pass
