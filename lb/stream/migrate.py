"""Deciding, at a stream's break, between continuing it elsewhere and ending it honestly.

lb/proxy.py runs a streamed request's journey in a loop: when a leg raises
:class:`~lb.migration.StreamBroken`, :meth:`Migrator.next` reads what the client got
(:class:`~lb.migration.Transcript`) and returns the continuation request to run through the
normal path again (admission, a prefill + decode pair, the connector's handshake) — or ends
the client's stream itself: only ``[DONE]`` (and the usage it owed) when the answer was in
fact complete; today's SSE error event + ``[DONE]`` when the case is not continued
(docs/migration.md's table) or no attempt is left. Every outcome is counted in
``pdlb_migrations_total{outcome}``.
"""

from __future__ import annotations

import dataclasses
import logging

from lb.config import Config
from lb.errors import UpstreamError
from lb.metrics import Metrics
from lb.migration import StreamBroken, Transcript, continuation, refusal
from lb.request import ProxyRequest
from lb.stream.answer import Answer
from lb.stream.port import ClientSide

log = logging.getLogger("pdlb.proxy")


class Migrator:
    """The migration steps of streamed requests (``[resilience] migrate_attempts``)."""

    def __init__(self, config: Config, answer: Answer, metrics: Metrics) -> None:
        self.attempts = config.resilience.migrate_attempts
        self.answer = answer
        self.metrics = metrics

    def begin(self, request: ProxyRequest) -> ProxyRequest:
        """The request with its (empty) transcript: its first leg records what it relays."""
        transcript = Transcript(request.body, request.endpoint == "chat",
                                refusal(request.endpoint, request.body))
        return dataclasses.replace(request, transcript=transcript)

    async def next(self, client: ClientSide, request: ProxyRequest, broken: StreamBroken
                   ) -> ProxyRequest | None:
        """The continuation to run, or None once the client's stream was ended here."""
        t = request.transcript
        if t is None:  # pragma: no cover - only transcript-carrying legs raise StreamBroken
            raise broken.error
        t.settle()
        if broken.backend is not None:
            t.avoid.append(broken.backend)
        if t.finish is not None:  # every token is out; only the end was lost
            self.metrics.migrations.labels(outcome="finished").inc()
            options = request.body.get("stream_options") or {}
            await self.answer.finish_stream(client, t, bool(options.get("include_usage")))
            return None
        reason = t.why_not()
        outcome = "refused"
        if reason is None and t.attempts >= self.attempts:
            reason, outcome = "no migration attempt left", "exhausted"
        body = None
        if reason is None:
            built = continuation(request.endpoint, t)
            if isinstance(built, str):
                reason = built
            else:
                body = built
        if body is None:
            log.warning("request %s: decode stream broke (%s); not continued: %s",
                        request.request_id, broken, reason)
            self.metrics.migrations.labels(outcome=outcome).inc()
            error: BaseException = broken.error
            if t.backend_error is not None:  # the decode's own words, held back until now
                error = UpstreamError(f"decode stream error: {t.backend_error}",
                                      code="backend_stream_error")
            await self.answer.fail_stream(client, request, error)
            return None
        t.attempts += 1
        self.metrics.migration_tokens.inc(t.generated)
        log.info("request %s: decode %s broke (%s) after %d tokens; continuing elsewhere"
                 " (attempt %d)", request.request_id, broken.backend,
                 t.backend_error or broken, t.generated, t.attempts)
        t.backend_error = None
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        return dataclasses.replace(request, body=body,
                                   max_tokens=limit if isinstance(limit, int) else None)

    async def failed(self, client: ClientSide, request: ProxyRequest,
                     error: BaseException) -> None:
        """A continuation that could not start (no backend, admission, a 4xx...)."""
        log.warning("request %s: continuation failed: %s", request.request_id, error)
        self.metrics.migrations.labels(outcome="failed").inc()
        await self.answer.fail_stream(client, request, error)
