"""OpenTelemetry traces, end to end: a real OTLP/HTTP receiver (an aiohttp server decoding the
protobuf with opentelemetry-proto) collects what a real pdlb in front of two emulators
exports. One request is one trace: the request span (a child of the client's traceparent),
its stage spans, one span per leg whose id each backend received as its traceparent, and
the handoff under the decode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from emulator import EmulatorConfig, EmulatorServer
from lb.errors import ConfigError
from tests.conftest import make_config

trace_pb2 = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

MODEL = "emulated-model"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP traces endpoint: POST /v1/traces, protobuf in, spans kept."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.resources: list[dict[str, Any]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = trace_pb2.ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            self.resources.append({a.key: a.value.string_value
                                   for a in resource_spans.resource.attributes})
            for scope in resource_spans.scope_spans:
                self.spans.extend(scope.spans)
        return web.Response(body=trace_pb2.ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def wait(self, count: int) -> list[Any]:
        for _ in range(300):
            if len(self.spans) >= count:
                return self.spans
            await asyncio.sleep(0.02)
        raise AssertionError(f"only {len(self.spans)} spans arrived, wanted {count}")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", r.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    r.url = f"http://127.0.0.1:{port}/v1/traces"
    yield r
    await runner.cleanup()


def _emulator(role: str) -> EmulatorServer:
    return EmulatorServer(EmulatorConfig(role=role, time_scale=50.0, seed=7))


def _attrs(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


async def _recent(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    async with http.get(url + "/_emulator/state") as r:
        state: dict[str, Any] = await r.json()
    recent: list[dict[str, Any]] = state["recent_requests"]
    return recent


@pytest.mark.parametrize("stream", [True, False])
async def test_one_request_is_one_trace(receiver: Receiver, start_pdlb: Any,
                                        monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export within 50 ms, not 5 s
    async with _emulator("prefill") as p, _emulator("decode") as d:
        url, _ = await start_pdlb(make_config(
            [p.url], [d.url], tracing={"enabled": True, "endpoint": receiver.url,
                                       "service_name": "pdlb-test"}))
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/completions", json={
                    "model": MODEL, "prompt": "hello there", "max_tokens": 4, "stream": stream},
                    headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}) as r:
                assert r.status == 200
                await r.read()
            spans = {s.name: s for s in await receiver.wait(6)}
            prefill_seen = (await _recent(http, p.url))[-1]["headers"]["traceparent"]
            decode_seen = (await _recent(http, d.url))[-1]["headers"]["traceparent"]

    assert set(spans) == {"POST /v1/completions", "pdlb.tokenize", "pdlb.admission",
                          "pdlb.prefill", "pdlb.decode", "pdlb.handoff"}
    assert {s.trace_id.hex() for s in spans.values()} == {CLIENT_TRACE}
    root = spans["POST /v1/completions"]
    assert root.parent_span_id.hex() == CLIENT_SPAN
    for child in ("pdlb.tokenize", "pdlb.admission", "pdlb.prefill", "pdlb.decode"):
        assert spans[child].parent_span_id == root.span_id, child
    assert spans["pdlb.handoff"].parent_span_id == spans["pdlb.decode"].span_id
    # each backend got its own leg's span as parent: vLLM's spans nest under the leg
    assert prefill_seen == f"00-{CLIENT_TRACE}-{spans['pdlb.prefill'].span_id.hex()}-01"
    assert decode_seen == f"00-{CLIENT_TRACE}-{spans['pdlb.decode'].span_id.hex()}-01"
    attrs = _attrs(root)
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["http.response.status_code"] == 200
    assert attrs["pdlb.prefill.backend"] == p.url and attrs["pdlb.decode.backend"] == d.url
    if not stream:  # a stream's usage is read only when the client asked for it
        assert attrs["gen_ai.usage.output_tokens"] == 4
    assert _attrs(spans["pdlb.prefill"])["server.address"] == p.url
    assert receiver.resources[0]["service.name"] == "pdlb-test"
    for span in spans.values():
        assert span.start_time_unix_nano <= span.end_time_unix_nano
    assert root.start_time_unix_nano <= spans["pdlb.prefill"].start_time_unix_nano
    assert spans["pdlb.decode"].end_time_unix_nano <= root.end_time_unix_nano


async def test_a_new_trace_without_traceparent_and_errors_marked(
        receiver: Receiver, start_pdlb: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No client context: the request span is a root. A 502 (prefill without
    kv_transfer_params, every attempt) marks it as an error, with the reason."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    async with EmulatorServer(EmulatorConfig(role="prefill", time_scale=50.0, seed=7,
                                             omit_kv_params=True)) as p, \
            _emulator("decode") as d:
        url, _ = await start_pdlb(make_config(
            [p.url], [d.url], tracing={"enabled": True, "endpoint": receiver.url}))
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/completions",
                                 json={"model": MODEL, "prompt": "hi", "max_tokens": 2}) as r:
                assert r.status == 502
            await receiver.wait(4)
            await asyncio.sleep(0.2)
    roots = [s for s in receiver.spans if s.name == "POST /v1/completions"]
    assert len(roots) == 1 and roots[0].parent_span_id == b""
    assert roots[0].status.code == 2  # STATUS_CODE_ERROR
    assert _attrs(roots[0])["pdlb.reason"] == "missing_kv_transfer_params"
    assert len([s for s in receiver.spans if s.name == "pdlb.prefill"]) == 2  # two attempts
    assert not [s for s in receiver.spans if s.name == "pdlb.decode"]


async def test_off_by_default_the_client_traceparent_passes_through(start_pdlb: Any) -> None:
    async with _emulator("prefill") as p, _emulator("decode") as d:
        url, app = await start_pdlb(make_config([p.url], [d.url]))
        from lb.serve.app import PROXY
        assert not app[PROXY].tracing.enabled
        client = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/completions", headers={"traceparent": client},
                                 json={"model": MODEL, "prompt": "hi", "max_tokens": 2}) as r:
                assert r.status == 200
            assert (await _recent(http, p.url))[-1]["headers"]["traceparent"] == client
            assert (await _recent(http, d.url))[-1]["headers"]["traceparent"] == client


def test_bad_tracing_config_is_named() -> None:
    with pytest.raises(ConfigError, match=r"tracing\.endpoint"):
        make_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"],
                     tracing={"enabled": True, "endpoint": "collector:4318"})
    with pytest.raises(ConfigError, match="sample_ratio"):
        make_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"],
                     tracing={"sample_ratio": 2})
