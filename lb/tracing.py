"""OpenTelemetry traces: one span per request, children per stage, ``traceparent`` to the legs.

Off by default (``[tracing] enabled``), and then the request path pays one attribute read
per stage: :data:`OFF` hands out a shared no-op context manager and never imports
OpenTelemetry. On (``pip install pdlb[otel]``), each completion request gets a SERVER span
``POST /v1/...`` — the child of the client's ``traceparent`` when it sent one — with child
spans ``pdlb.tokenize``, ``pdlb.admission`` (the wait for budget), one ``pdlb.prefill`` per
prefill attempt and one ``pdlb.decode`` per decode attempt (its ``pdlb.handoff`` child: the
decode sent → its response headers, where the KV pull happens). Each leg's span is sent to
the backend as ``traceparent``, so vLLM's own spans (``--otlp-traces-endpoint``) hang under
the leg that caused them, in the same trace. Spans go out in batches over OTLP/HTTP
(protobuf) from the SDK's background thread.

Attributes follow the GenAI semantic conventions where they exist (``gen_ai.operation.name``,
``gen_ai.request.model``, ``gen_ai.request.max_tokens``, ``gen_ai.usage.input_tokens``,
``gen_ai.usage.output_tokens``), plus ``pdlb.*`` for what they do not cover (backends,
cached tokens, the reject or error reason). Never a prompt or a key.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from lb.config import TracingConfig
from lb.errors import ConfigError

if TYPE_CHECKING:
    from lb.accesslog import RequestRecord

log = logging.getLogger("pdlb.tracing")

_NOOP = contextlib.nullcontext()
_OPERATION = {"chat": "chat", "completions": "text_completion"}


class Tracing:
    """Tracing switched off: every method is a no-op and nothing is imported."""

    enabled = False

    def request(self, path: str, endpoint: str, headers: Mapping[str, str],
                ) -> contextlib.AbstractContextManager[Any]:
        """The request's span, current for the code inside (a no-op here)."""
        return _NOOP

    def stage(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
        """A child span of the current one around a stage (a no-op here)."""
        return _NOOP

    def inject(self, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` plus the current span's ``traceparent`` (unchanged here)."""
        return headers

    def handoff(self, started_ns: int, seconds: float | None) -> None:
        """Record the decode's handoff as a child of the current (decode) span."""

    def finish(self, record: RequestRecord, status: int) -> None:
        """Set the request span's outcome attributes (a no-op here)."""

    def shutdown(self) -> None:
        """Flush what is buffered (a no-op here)."""


OFF = Tracing()


class OtelTracing(Tracing):
    """Tracing through the OpenTelemetry SDK, exported over OTLP/HTTP."""

    enabled = True

    def __init__(self, config: TracingConfig) -> None:
        try:
            from opentelemetry import context, trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError:
            raise ConfigError("[tracing] enabled = true needs OpenTelemetry: "
                              "pip install 'pdlb[otel]'") from None
        from lb.metrics import pdlb_version

        version = pdlb_version()
        resource = Resource.create({"service.name": config.service_name,
                                    "service.version": version})
        self._provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
        exporter = (OTLPSpanExporter(endpoint=config.endpoint) if config.endpoint
                    else OTLPSpanExporter())
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("pdlb", version)
        self._propagator = TraceContextTextMapPropagator()
        self._context = context
        self._trace = trace
        self._server = trace.SpanKind.SERVER
        self._client = trace.SpanKind.CLIENT
        self._internal = trace.SpanKind.INTERNAL
        self._error = trace.StatusCode.ERROR

    @contextlib.contextmanager
    def request(self, path: str, endpoint: str, headers: Mapping[str, str]) -> Iterator[Any]:
        parent = self._propagator.extract(headers) if "traceparent" in headers else None
        attributes = {"http.request.method": "POST", "url.path": path,
                      "gen_ai.operation.name": _OPERATION.get(endpoint, endpoint)}
        with self._tracer.start_as_current_span(
                f"POST {path}", context=parent, kind=self._server, attributes=attributes,
                record_exception=False, set_status_on_exception=False) as span:
            yield span

    @contextlib.contextmanager
    def stage(self, name: str, **attributes: Any) -> Iterator[Any]:
        kind = self._client if name in ("pdlb.prefill", "pdlb.decode") else self._internal
        with self._tracer.start_as_current_span(
                name, kind=kind,
                attributes={k: v for k, v in attributes.items() if v is not None}) as span:
            yield span

    def inject(self, headers: dict[str, str]) -> dict[str, str]:
        out = dict(headers)
        self._propagator.inject(out)
        return out

    def handoff(self, started_ns: int, seconds: float | None) -> None:
        if seconds is None:
            return
        span = self._tracer.start_span("pdlb.handoff", start_time=started_ns)
        span.end(end_time=started_ns + int(seconds * 1e9))

    def finish(self, record: RequestRecord, status: int) -> None:
        span = self._trace.get_current_span()
        if not span.is_recording():
            return
        usage = record.usage or {}
        values = {
            "http.response.status_code": status,
            "gen_ai.request.model": record.model,
            "gen_ai.usage.input_tokens": usage.get("prompt_tokens", record.prompt_tokens),
            "gen_ai.usage.output_tokens": usage.get("completion_tokens"),
            "pdlb.request_id": record.request_id,
            "pdlb.cached_tokens": record.cached_tokens,
            "pdlb.prefill.backend": record.prefill_backend,
            "pdlb.decode.backend": record.decode_backend,
            "pdlb.reason": record.reason,
        }
        span.set_attributes({k: v for k, v in values.items()
                             if isinstance(v, str | int | float) and not isinstance(v, bool)})
        if status >= 500:
            span.set_status(self._error, record.reason or str(status))

    def shutdown(self) -> None:
        self._provider.shutdown()


def make_tracing(config: TracingConfig) -> Tracing:
    return OtelTracing(config) if config.enabled else OFF


def now_ns() -> int:
    """The wall clock OpenTelemetry timestamps are in."""
    return time.time_ns()
