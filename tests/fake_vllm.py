"""A tiny, scriptable vLLM stand-in for the proxy's edge cases (real sockets, real HTTP).

The emulator (``emulator/``) is the faithful backend; this fake exists for byte-level cases
the emulator has no reason to produce: events split mid-JSON across TCP writes, CRLF framing,
garbage, a stream cut at an exact byte. Each behaviour is a field of :class:`FakeBehaviour`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class FakeBehaviour:
    tokens: int = 4
    prompt_tokens: int = 7
    cached_tokens: int | None = 3  # prefill's usage.prompt_tokens_details.cached_tokens
    decode_cached_tokens: int | None = 7  # the buggy decode figure
    omit_kv_params: bool = False
    status: int = 200
    error_body: bytes = b'{"error": {"message": "boom", "type": "BadRequestError", "param": null, "code": 400}}'
    split_events: bool = False  # write each event in two pieces, cut inside the JSON
    crlf: bool = False
    drop_after: int | None = None  # close the connection after N events
    delay_s: float = 0.0  # before answering
    chunk_delay_s: float = 0.0
    end_delay_s: float = 0.0  # after [DONE], before the terminating chunk
    requests: list[dict[str, Any]] = field(default_factory=list)
    aborted: int = 0
    finished: int = 0
    model: str = "fake"
    metrics_text: str = ""
    models_delay_s: float = 0.0  # before answering GET /v1/models


def _usage(b: FakeBehaviour, prompt: int, completion: int, cached: int | None) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None if cached is None else {"cached_tokens": cached},
    }


def make_fake(role: str, b: FakeBehaviour) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        b.requests.append({"path": request.path, "headers": {k.lower(): v for k, v in request.headers.items()}, "body": body})
        if b.delay_s:
            await asyncio.sleep(b.delay_s)
        if b.status != 200:
            return web.Response(status=b.status, body=b.error_body, content_type="application/json")
        chat = request.path.endswith("chat/completions")
        if role == "prefill":
            payload: dict[str, Any] = {
                "id": "cmpl-fake", "object": "text_completion", "created": 1, "model": "fake",
                "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                "usage": _usage(b, b.prompt_tokens, 1, b.cached_tokens),
                "kv_transfer_params": None if b.omit_kv_params else {
                    "do_remote_prefill": True, "do_remote_decode": False,
                    "remote_block_ids": [[1, 2]], "remote_engine_id": "eng-1",
                    "remote_request_id": "cmpl-fake-0-abcd1234", "remote_host": "localhost",
                    "remote_port": 5600, "tp_size": 1, "remote_prefill_cached_tokens": 3,
                },
            }
            return web.json_response(payload, dumps=lambda o: orjson.dumps(o).decode())
        n = body.get("max_tokens") or b.tokens
        if not body.get("stream"):
            text = " ".join(f"t{i}" for i in range(n))
            choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": "length"} if chat else
                      {"index": 0, "text": text, "finish_reason": "length"})
            payload = {"id": "cmpl-d", "object": "chat.completion" if chat else "text_completion",
                       "created": 1, "model": "fake", "choices": [choice],
                       "usage": _usage(b, b.prompt_tokens, n, b.decode_cached_tokens),
                       "kv_transfer_params": None}
            b.finished += 1
            return web.json_response(payload, dumps=lambda o: orjson.dumps(o).decode())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        sep = b"\r\n\r\n" if b.crlf else b"\n\n"
        events = []
        for i in range(n):
            delta = {"delta": {"content": f"t{i} "}} if chat else {"text": f"t{i} "}
            events.append({"id": "cmpl-d", "object": "x", "created": 1, "model": "fake",
                           "choices": [{"index": 0, **delta, "finish_reason": None}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({"id": "cmpl-d", "object": "x", "created": 1, "model": "fake",
                           "choices": [], "usage": _usage(b, b.prompt_tokens, n,
                                                          b.decode_cached_tokens)})
        try:
            for i, event in enumerate(events):
                if b.drop_after is not None and i >= b.drop_after:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                data = b"data: " + orjson.dumps(event) + sep
                if b.split_events:
                    mid = len(data) // 2
                    await resp.write(data[:mid])
                    await asyncio.sleep(0.002)
                    await resp.write(data[mid:])
                else:
                    await resp.write(data)
                if b.chunk_delay_s:
                    await asyncio.sleep(b.chunk_delay_s)
            await resp.write(b"data: [DONE]" + sep)
            if b.end_delay_s:
                await asyncio.sleep(b.end_delay_s)
            b.finished += 1
        except (asyncio.CancelledError, ConnectionResetError):
            b.aborted += 1
            raise
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(request: web.Request) -> web.Response:
        if b.models_delay_s:
            await asyncio.sleep(b.models_delay_s)
        return web.json_response({"object": "list", "data": [{"id": b.model, "object": "model"}]})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=b.metrics_text)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    return app


@contextlib.asynccontextmanager
async def run_app(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
