"""A fake OpenAI-compatible streaming server for tests and demos (aiohttp).

It streams ``max_tokens`` tokens as SSE, honours ``stream_options`` (``include_usage``,
``continuous_usage_stats``), can bundle several tokens per chunk, wait before the first
token and between chunks, fail every k-th request, and serve a pdlb-like ``/metrics``.
Shipped so that users can test their own harness against it, like httpx's MockTransport.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web


@dataclass
class FakeServerOptions:
    ttft_s: float = 0.0
    chunk_interval_s: float = 0.0
    tokens_per_chunk: int = 1
    fail_every: int = 0          # every k-th request answers HTTP 500 (0: never)
    fail_midstream_every: int = 0  # every k-th request ends its stream early
    role_chunk: bool = True      # chat: a first chunk with only the role, as vLLM sends
    usage: bool = True           # honour include_usage
    model: str = "fake-model"
    metrics_text: str | None = None  # a fixed /metrics page
    pdlb_metrics: bool = False   # serve pdlb-like stage histograms that grow per request
    record_bodies: bool = False  # keep every request body in app[BODIES]

# The stage durations the fake reports for each request when pdlb_metrics is on.
FAKE_STAGE_SECONDS = {"prefill": 0.010, "handoff": 0.002, "decode": 0.030, "ttft": 0.012,
                      "e2e": 0.045}
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


OPTIONS = web.AppKey("options", FakeServerOptions)
COUNTER = web.AppKey("counter", list)
BODIES = web.AppKey("bodies", list)


def _chunk(chat: bool, model: str, text: str, finish: str | None,
           usage: dict[str, int] | None) -> bytes:
    obj: dict[str, Any]
    if chat:
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        obj = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
               "choices": [choice]}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        obj = {"id": "cmpl-fake", "object": "text_completion", "model": model,
               "choices": [choice]}
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def _generate(request: web.Request) -> web.StreamResponse:
    opts = request.app[OPTIONS]
    counter = request.app[COUNTER]
    counter[0] += 1
    n_req = counter[0]
    if opts.fail_every and n_req % opts.fail_every == 0:
        return web.json_response({"error": {"message": "injected failure"}}, status=500)
    body = orjson.loads(await request.read())
    if opts.record_bodies:
        request.app[BODIES].append(body)
    chat = request.path.endswith("/chat/completions")
    max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
    prompt_text = (orjson.dumps(body.get("messages")).decode() if chat
                   else str(body.get("prompt", "")))
    prompt_tokens = max(1, len(prompt_text.split()))
    so = body.get("stream_options") or {}
    include_usage = opts.usage and bool(so.get("include_usage"))
    continuous = include_usage and bool(so.get("continuous_usage_stats"))
    if not body.get("stream"):
        text = "tok " * max_tokens
        return web.json_response({"choices": [{"text": text, "finish_reason": "length"}],
                                  "usage": {"prompt_tokens": prompt_tokens,
                                            "completion_tokens": max_tokens}})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    model = opts.model
    if chat and opts.role_chunk:
        role = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "finish_reason": None}]}
        await resp.write(b"data: " + orjson.dumps(role) + b"\n\n")
    if opts.ttft_s:
        await asyncio.sleep(opts.ttft_s)
    sent = 0
    while sent < max_tokens:
        if opts.fail_midstream_every and n_req % opts.fail_midstream_every == 0 and sent:
            return resp  # ends without finish_reason or [DONE]
        k = min(opts.tokens_per_chunk, max_tokens - sent)
        sent += k
        finish = "length" if sent >= max_tokens else None
        usage = ({"prompt_tokens": prompt_tokens, "completion_tokens": sent,
                  "total_tokens": prompt_tokens + sent} if continuous else None)
        await resp.write(_chunk(chat, model, "tok " * k, finish, usage))
        if opts.chunk_interval_s and sent < max_tokens:
            await asyncio.sleep(opts.chunk_interval_s)
    if include_usage:
        final = {"id": "x", "object": "chunk", "model": model, "choices": [],
                 "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sent,
                           "total_tokens": prompt_tokens + sent}}
        await resp.write(b"data: " + orjson.dumps(final) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _models(request: web.Request) -> web.Response:
    model = request.app[OPTIONS].model
    return web.json_response({"object": "list", "data": [{"id": model, "root": model}]})


async def _metrics(request: web.Request) -> web.Response:
    opts = request.app[OPTIONS]
    if opts.pdlb_metrics:
        return web.Response(text=_pdlb_metrics(request.app[COUNTER][0]),
                            content_type="text/plain")
    if opts.metrics_text is None:
        raise web.HTTPNotFound()
    return web.Response(text=opts.metrics_text, content_type="text/plain")


def _pdlb_metrics(n: int) -> str:
    names = {"prefill": "pdlb_prefill_duration_seconds",
             "handoff": "pdlb_handoff_duration_seconds",
             "decode": "pdlb_decode_duration_seconds", "ttft": "pdlb_ttft_seconds",
             "e2e": "pdlb_e2e_duration_seconds"}
    lines = []
    for stage, name in names.items():
        v = FAKE_STAGE_SECONDS[stage]
        lines.append(f"# TYPE {name} histogram")
        for b in _BUCKETS:
            lines.append(f'{name}_bucket{{le="{b}"}} {n if v <= b else 0}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {n}')
        lines.append(f"{name}_sum {v * n}")
        lines.append(f"{name}_count {n}")
    return "\n".join(lines) + "\n"


def make_app(options: FakeServerOptions | None = None) -> web.Application:
    app = web.Application()
    app[OPTIONS] = options or FakeServerOptions()
    app[COUNTER] = [0]
    app[BODIES] = []
    app.router.add_post("/v1/completions", _generate)
    app.router.add_post("/v1/chat/completions", _generate)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/metrics", _metrics)
    return app
