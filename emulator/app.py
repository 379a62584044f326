"""The aiohttp application: vLLM's HTTP surface plus the emulator's admin endpoints.

vLLM routes: POST /v1/completions, POST /v1/chat/completions (one handler, see
:func:`_generate`), GET /v1/models, GET /health, GET /metrics, POST /tokenize,
POST /detokenize, GET /version, GET /load.

Admin routes (not in vLLM): GET|POST /_emulator/faults, POST /_emulator/reset,
GET /_emulator/state, and the KV side channel POST /_emulator/kv/pull|await|release.
With ``kv_connector = "mooncake"`` the server is also its own bootstrap server: GET /query.

Client disconnects are noticed through handler cancellation (``EmulatorServer`` runs the
app with ``handler_cancellation=True``; so does aiohttp's test server) or a failed write,
and abort the sequence at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Any, NoReturn

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from emulator.config import EmulatorConfig
from emulator.connectors import query_answer
from emulator.engine import Engine, Sequence
from emulator.faults import FaultError, Faults
from emulator.kv import KvPuller
from emulator.kv_events import Publisher
from emulator.metrics import EngineMetrics
from emulator.protocol import (
    VLLM_VERSION,
    APIError,
    GenRequest,
    Kind,
    StreamChunks,
    bad_request,
    completion_response,
    error_body,
    lora_modules,
    model_list,
    parse_request,
    prompt_tokens_details,
    schema_error,
    usage,
)
from emulator.tokens import ChatFormatError, Tokenizer

log = logging.getLogger(__name__)

CONFIG: web.AppKey[EmulatorConfig] = web.AppKey("config", EmulatorConfig)
ENGINE: web.AppKey[Engine] = web.AppKey("engine", Engine)
TOKENIZER: web.AppKey[Tokenizer] = web.AppKey("tokenizer", Tokenizer)
RECENT: web.AppKey[deque[dict[str, Any]]] = web.AppKey("recent")
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)
PUBLISHER: web.AppKey[Publisher | None] = web.AppKey("kv_events_publisher")
ADAPTERS: web.AppKey[dict[str, str]] = web.AppKey("lora_adapters")
"""The LoRA adapters served now ({name: path}): --lora-modules, then runtime loads."""

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"


def create_app(config: EmulatorConfig) -> web.Application:
    """Build an emulated vLLM server (nothing runs until the app starts)."""
    app = web.Application(client_max_size=256 * 1024 * 1024, middlewares=[_not_found])
    tokenizer = Tokenizer()
    puller = KvPuller(lambda: app[SESSION], config.kv_pull_timeout_s / config.time_scale)
    engine = Engine(config, tokenizer, EngineMetrics(config.model),
                    Faults.from_config(config), puller)
    app[CONFIG] = config
    app[ENGINE] = engine
    app[TOKENIZER] = tokenizer
    app[RECENT] = deque(maxlen=config.recent_requests_max)
    app[ADAPTERS] = lora_modules(config)
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/load_lora_adapter", _load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", _unload_lora_adapter)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/tokenize", _tokenize)
    app.router.add_post("/detokenize", _detokenize)
    app.router.add_get("/version", _version)
    app.router.add_get("/load", _load)
    app.router.add_get("/kv_event_sources", _kv_event_sources)
    app.router.add_get("/_emulator/faults", _get_faults)
    app.router.add_post("/_emulator/faults", _set_faults)
    app.router.add_post("/_emulator/reset", _reset)
    app.router.add_get("/_emulator/state", _state)
    app.router.add_post("/_emulator/kv/pull", _kv_pull)
    app.router.add_post("/_emulator/kv/await", _kv_await)
    app.router.add_post("/_emulator/kv/release", _kv_release)
    if config.kv_connector == "mooncake":
        app.router.add_get("/query", _mooncake_query)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    app[SESSION] = aiohttp.ClientSession(connector=connector)
    engine = app[ENGINE]
    config = app[CONFIG]
    publisher = None
    if config.kv_events_endpoint:
        publisher = Publisher(config.kv_events_endpoint, config.kv_events_replay_endpoint,
                              config.kv_events_topic, block_size=config.block_size)
        publisher.start()
        engine.prefix_cache.publisher = publisher
    app[PUBLISHER] = publisher
    engine.start()
    try:
        yield
    finally:
        await engine.stop()
        await app[SESSION].close()
        if publisher is not None:
            engine.prefix_cache.publisher = None
            await publisher.stop()


async def _kv_event_sources(request: web.Request) -> web.Response:
    """vLLM's ``GET /kv_event_sources``: the KV-events config per DP rank ({} when off)."""
    publisher = request.app[PUBLISHER]
    body = {} if publisher is None else publisher.sources(request.host)
    return web.json_response(body)


@web.middleware
async def _not_found(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """FastAPI's answer to unknown routes: {"detail": "Not Found"}."""
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        return _json({"detail": exc.reason}, exc.status)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status,
                        content_type="application/json", headers=headers)


def _error(exc: APIError) -> web.Response:
    return _json(exc.body(), exc.status)


async def _read_json(request: web.Request, *, vllm_route: bool = True) -> Any:
    """The JSON body; vLLM's routes (validate_json_request) take only application/json."""
    if vllm_route and request.content_type != "application/json":
        raise schema_error("Unsupported Media Type: Only 'application/json' is allowed", None)
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise schema_error(
            {"type": "json_invalid", "loc": "body", "msg": "JSON decode error", "input": {},
             "ctx": {"error": str(exc)}},
            "body",
        ) from None


def _record(request: web.Request, body: Any) -> None:
    request.app[RECENT].append(
        {
            "path": request.path,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": body,
        }
    )


def _unauthorized(request: web.Request) -> web.Response | None:
    key = request.app[CONFIG].api_key
    if key is None or request.headers.get("Authorization") == f"Bearer {key}":
        return None
    return _json({"error": "Unauthorized"}, 401)


def _note_port(request: web.Request, engine: Engine) -> None:
    if engine.advertised_port is None:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if sockname:
            engine.advertised_port = int(sockname[1])


# --- generation -------------------------------------------------------------------------


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def _generate(request: web.Request, kind: Kind) -> web.StreamResponse:
    """POST /v1/completions and /v1/chat/completions: one code path for both."""
    denied = _unauthorized(request)
    if denied is not None:
        return denied
    app = request.app
    engine = app[ENGINE]
    config = app[CONFIG]
    _note_port(request, engine)
    engine.counters.requests_total += 1
    try:
        body = await _read_json(request)
    except APIError as exc:
        _record(request, None)
        return _error(exc)
    _record(request, body)
    faults = engine.faults
    if faults.extra_latency_ms > 0:
        await asyncio.sleep(faults.extra_latency_ms / 1000.0)
    header_id = request.headers.get("X-Request-Id")
    try:
        req = parse_request(kind, body, header_id, app[TOKENIZER], config, app[ADAPTERS])
        req.dp_rank = _dp_rank(request, config)
    except APIError as exc:
        return _error(exc)
    if faults.roll_failure(engine.rng):
        engine.counters.requests_failed += 1
        return _json(error_body("Internal server error (injected by the emulator's fail_rate)",
                                "InternalServerError", 500), 500)
    headers = None
    if config.enable_request_id_headers:
        headers = {"X-Request-Id": header_id or uuid.uuid4().hex}
    seq = engine.submit(req)
    try:
        if req.stream:
            return await _stream(request, engine, seq, req, headers)
        while not seq.finished:
            await seq.wait()
    except (asyncio.CancelledError, ConnectionResetError):
        engine.abort(seq)
        raise
    if seq.error is not None:
        return _json(error_body(seq.error, "InternalServerError", 500), 500)
    if seq.finish_reason == "abort":
        return _json(error_body("Client disconnected", "BadRequestError", 400), 400)
    if faults.drop_after_chunks is not None:
        return _drop(request, engine)
    payload = completion_response(
        req,
        int(time.time()),
        engine.text_of(seq),
        seq.finish_reason,
        seq.stop_reason,
        seq.output,
        usage(len(req.prompt_ids), len(seq.output), _details(engine, req, seq), dump_nulls=True),
        seq.kv_transfer_params,
    )
    return _json(payload, headers=headers)


def _dp_rank(request: web.Request, config: EmulatorConfig) -> int:
    """X-data-parallel-rank, checked like vLLM's AsyncLLM (out of range: 400)."""
    raw = request.headers.get("X-data-parallel-rank")
    if raw is None:
        return 0
    try:
        rank = int(raw)
    except ValueError:
        rank = -1
    if not 0 <= rank < config.data_parallel_size:
        raise APIError(400, "BadRequestError",
                       f"data_parallel_rank {raw} is out of range "
                       f"[0, {config.data_parallel_size}).", None)
    return rank


def _details(engine: Engine, req: GenRequest, seq: Sequence) -> dict[str, Any] | None:
    return prompt_tokens_details(req.kind, engine.config.enable_prompt_tokens_details,
                                 seq.cached_tokens, seq.created_cache_tokens)


async def _stream(
    request: web.Request,
    engine: Engine,
    seq: Sequence,
    req: GenRequest,
    headers: dict[str, str] | None,
) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={**_SSE_HEADERS, **(headers or {})})
    await resp.prepare(request)
    drop_after = engine.faults.drop_after_chunks
    if drop_after == 0:
        return _drop(request, engine, seq)
    chunks = StreamChunks(req, int(time.time()))
    dumps = orjson.dumps
    sent = 0
    cursor = 0
    while True:
        while cursor == len(seq.output) and not seq.finished:
            await seq.wait()
        if seq.error is not None:
            await resp.write(b"data: " + dumps({"error": error_body(
                seq.error, "InternalServerError", 500)["error"]}) + b"\n\n" + _DONE)
            return resp
        if seq.finish_reason == "abort":
            return resp  # the server is shutting down
        end = len(seq.output)
        parts: list[bytes] = []
        if cursor == 0 and end > 0:
            role = chunks.role_chunk()
            if role is not None:
                parts.append(b"data: " + dumps(role) + b"\n\n")
        done = seq.finished
        last = end - 1 if done else end
        texts = seq.texts
        for i in range(cursor, end):
            if chunks.fast and 0 < i < last:
                parts.append(chunks.plain(texts[i]))
                continue
            final = done and i == last
            chunk = chunks.token_chunk(
                texts[i], [seq.output[i]], i + 1,
                seq.finish_reason if final else None,
                seq.stop_reason if final else None,
                i == 0,
            )
            parts.append(b"data: " + dumps(chunk) + b"\n\n")
        cursor = end
        if drop_after is not None and sent + len(parts) >= drop_after:
            await resp.write(b"".join(parts[: drop_after - sent]))
            return _drop(request, engine, seq)
        sent += len(parts)
        if done:
            if req.include_usage:
                parts.append(b"data: " + dumps(
                    chunks.usage_chunk(len(seq.output), _details(engine, req, seq))) + b"\n\n")
            parts.append(_DONE)
            await resp.write(b"".join(parts))
            await resp.write_eof()
            return resp
        await resp.write(b"".join(parts))


def _drop(request: web.Request, engine: Engine, seq: Sequence | None = None) -> NoReturn:
    """The drop_after_chunks fault: close the TCP connection with no (further) bytes."""
    engine.counters.requests_dropped += 1
    if seq is not None:
        engine.abort(seq, client_gone=False)
    transport = request.transport
    if transport is not None:
        transport.close()
    raise _Dropped


class _Dropped(web.HTTPException):
    """Ends a handler whose connection the emulator closed on purpose."""

    status_code = 500


# --- other vLLM endpoints -------------------------------------------------------------


async def _models(request: web.Request) -> web.Response:
    denied = _unauthorized(request)
    if denied is not None:
        return denied
    return _json(model_list(request.app[CONFIG], int(time.time()), request.app[ADAPTERS]))


async def _load_lora_adapter(request: web.Request) -> web.Response:
    """vLLM's runtime LoRA loading (VLLM_ALLOW_RUNTIME_LORA_UPDATING): {lora_name, lora_path}."""
    try:
        body = await _read_json(request)
    except APIError as exc:
        return _error(exc)
    name = body.get("lora_name") if isinstance(body, dict) else None
    path = body.get("lora_path") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
        return _error(bad_request("Both 'lora_name' and 'lora_path' must be provided."))
    adapters = request.app[ADAPTERS]
    if name in adapters:
        return _error(bad_request(f"The lora adapter '{name}' has already been loaded."))
    adapters[name] = path
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def _unload_lora_adapter(request: web.Request) -> web.Response:
    try:
        body = await _read_json(request)
    except APIError as exc:
        return _error(exc)
    name = body.get("lora_name") if isinstance(body, dict) else None
    adapters = request.app[ADAPTERS]
    if not isinstance(name, str) or name not in adapters:
        return _error(APIError(404, "NotFoundError",
                               f"The lora adapter '{name}' cannot be found.", "lora_name"))
    del adapters[name]
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


async def _health(request: web.Request) -> web.Response:
    return web.Response(status=503 if request.app[ENGINE].faults.unhealthy else 200)


async def _metrics(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    engine.update_gauges()
    return web.Response(body=engine.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _version(request: web.Request) -> web.Response:
    return _json({"version": VLLM_VERSION})


async def _load(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return _json({"server_load": engine.num_running + engine.num_waiting})


async def _tokenize(request: web.Request) -> web.Response:
    """POST /tokenize: {"model", "prompt"} or {"model", "messages"} → count and ids."""
    config = request.app[CONFIG]
    tokenizer = request.app[TOKENIZER]
    try:
        body = await _read_json(request)
        _record(request, body)
        if not isinstance(body, dict):
            raise schema_error({"type": "model_attributes_type", "loc": "body",
                                "msg": "Input should be a valid dictionary", "input": body},
                               "body")
        model = body.get("model")
        if model and model != config.model:
            raise APIError(404, "NotFoundError", f"The model `{model}` does not exist. "
                           f"Valid aliases: {config.model}.", "model")
        if "messages" in body:
            tokens = tokenizer.render_chat(body["messages"],
                                           bool(body.get("add_generation_prompt", True)))
        elif isinstance(body.get("prompt"), str):
            add = bool(body.get("add_special_tokens", True)) and config.add_bos
            tokens = tokenizer.encode_prompt(body["prompt"], add)
        elif isinstance(body.get("prompt"), list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in body["prompt"]
        ):
            tokens = list(body["prompt"])
        else:
            raise schema_error({"type": "missing", "loc": "body.prompt",
                                "msg": "Field required", "input": body}, "body.prompt")
    except APIError as exc:
        return _error(exc)
    except ChatFormatError as exc:
        return _error(APIError(400, "BadRequestError", str(exc), "messages"))
    token_strs = [tokenizer.token_str(t) for t in tokens] if body.get("return_token_strs") \
        else None
    return _json({"count": len(tokens), "max_model_len": config.max_model_len,
                  "tokens": tokens, "token_strs": token_strs})


async def _detokenize(request: web.Request) -> web.Response:
    tokenizer = request.app[TOKENIZER]
    try:
        body = await _read_json(request)
    except APIError as exc:
        return _error(exc)
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        return _error(schema_error({"type": "missing", "loc": "body.tokens",
                                    "msg": "Field required", "input": body}, "body.tokens"))
    return _json({"prompt": tokenizer.decode(tokens)})


# --- admin ------------------------------------------------------------------------------


async def _get_faults(request: web.Request) -> web.Response:
    return _json(request.app[ENGINE].faults.as_dict())


async def _set_faults(request: web.Request) -> web.Response:
    faults = request.app[ENGINE].faults
    try:
        faults.update(await _read_json(request, vllm_route=False))
    except APIError as exc:
        return _error(exc)
    except FaultError as exc:
        return _json({"error": str(exc)}, 400)
    return _json(faults.as_dict())


async def _reset(request: web.Request) -> web.Response:
    request.app[ENGINE].reset()
    request.app[RECENT].clear()
    return _json({"ok": True})


async def _state(request: web.Request) -> web.Response:
    return _json(state_of(request.app))


def state_of(app: web.Application) -> dict[str, Any]:
    """What GET /_emulator/state answers."""
    engine = app[ENGINE]
    config = app[CONFIG]
    recent = app[RECENT]
    return {
        "role": config.role,
        "kv_connector": config.kv_connector,
        "model": config.model,
        "engine_id": engine.engine_id,
        "advertised_port": engine.advertised_port,
        "running": engine.num_running,
        "waiting": engine.num_waiting,
        "kv_held": len(engine.holds),
        "kv_awaiting": engine.holds.waiting,
        "kv_holds_expired": engine.holds.expired_total,
        "kv_holds_released": engine.holds.released_total,
        "kv_holds_pulled": engine.holds.pulled_total,
        "kv_used_blocks": engine.used_blocks,
        "kv_total_blocks": engine.total_blocks,
        "kv_cache_usage": engine.kv_usage,
        "prefix_cache_blocks": len(engine.prefix_cache),
        **asdict(engine.counters),
        "faults": engine.faults.as_dict(),
        "recent_requests": list(recent),
    }


async def _kv_pull(request: web.Request) -> web.Response:
    """The emulated NIXL side channel: a decode takes this prefill's KV hold."""
    engine = request.app[ENGINE]
    try:
        body = await _read_json(request, vllm_route=False)
        request_id = str(body["remote_request_id"])
        engine_id = str(body["remote_engine_id"])
        prompt_hash = int(body["prompt_hash"])
    except (APIError, KeyError, TypeError, ValueError):
        return _json({"status": "bad_request"}, 400)
    status, tokens = engine.holds.take(request_id, engine_id, prompt_hash)
    code = 200 if status == "ok" else 409 if status.endswith("mismatch") else 404
    return _json({"status": status, "num_tokens": tokens}, code)


async def _kv_await(request: web.Request) -> web.Response:
    """A decode takes the hold ``key``, waiting up to ``wait_s`` for it to be staged (the
    emulated push / bootstrap-room / P2P transfer)."""
    engine = request.app[ENGINE]
    try:
        body = await _read_json(request, vllm_route=False)
        key = str(body["key"])
        engine_id = body.get("engine_id")
        prompt_hash = int(body["prompt_hash"])
        wait_s = float(body.get("wait_s", 0.0))
    except (APIError, KeyError, TypeError, ValueError):
        return _json({"status": "bad_request"}, 400)
    status, tokens = await engine.holds.wait_take(
        key, None if engine_id is None else str(engine_id), prompt_hash, max(wait_s, 0.0))
    code = 200 if status == "ok" else 409 if status.endswith("mismatch") else 404
    return _json({"status": status, "num_tokens": tokens}, code)


async def _kv_release(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    try:
        body = await _read_json(request, vllm_route=False)
        request_id = str(body["remote_request_id"])
        before_arrival = bool(body.get("before_arrival", False))
    except (APIError, KeyError, TypeError):
        return _json({"status": "bad_request"}, 400)
    released = engine.holds.release(request_id, before_arrival=before_arrival)
    return _json({"status": "released" if released else "unknown"})


async def _mooncake_query(request: web.Request) -> web.Response:
    """vLLM's MooncakeBootstrapServer GET /query: DP rank → engine id and worker address."""
    engine = request.app[ENGINE]
    _note_port(request, engine)
    return _json(query_answer(engine))
