"""The HTTP side: build a request body, send it on the shared session, time its stream.

One ``aiohttp.ClientSession`` serves the whole run (a session per request would put TCP
connect time inside TTFT). The SSE parser splits reads on blank lines, decodes each event
with orjson once, and stamps every output-bearing chunk with the time its read arrived.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from time import perf_counter
from typing import Any

import aiohttp
import orjson

from loadgen.records import Record
from loadgen.workload import Item, Message

_ERROR_BODY_BYTES = 300


class LoadgenError(Exception):
    """A run cannot start or go on (bad endpoint, unreachable server, failed preflight)."""


def make_session(limit: int, timeout_s: float) -> aiohttp.ClientSession:
    """The run's one session; ``limit`` 0 means no client-side connection cap."""
    connector = aiohttp.TCPConnector(
        limit=limit, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=60,
        force_close=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 30.0)),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )


def flatten_messages(messages: Sequence[Message]) -> str:
    """Messages → a completions prompt (plain concatenation of contents)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append(str(content or ""))
    return "\n".join(out)


class Sender:
    """Builds bodies for one endpoint and sends them; one instance per run."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        api_url: str,
        endpoint: str,
        model: str,
        t0: float,
        ignore_eos: bool = True,
        continuous_usage: bool = True,
        extra_body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.session = session
        self.api_url = api_url
        self.chat = endpoint == "chat"
        self.t0 = t0
        self.continuous_usage = continuous_usage
        stream_options: dict[str, Any] = {"include_usage": True}
        if continuous_usage:
            stream_options["continuous_usage_stats"] = True
        self.base: dict[str, Any] = {"model": model, "stream": True,
                                     "stream_options": stream_options}
        if ignore_eos:
            self.base["ignore_eos"] = True
        self.base.update(extra_body or {})
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.headers.update(headers or {})

    def body(self, item: Item, turn: int, history: Sequence[tuple[str, str]] = (),
             max_tokens: int | None = None) -> bytes:
        """The JSON body of ``item``'s turn ``turn``; ``history`` is (user, answer) pairs."""
        t = item.turns[turn]
        body = dict(self.base)
        body["max_tokens"] = max_tokens if max_tokens is not None else t.max_tokens
        if self.chat:
            if t.messages is not None:
                msgs: list[Message] = list(t.messages)
            else:
                msgs = [{"role": "system", "content": item.system}] if item.system else []
                for user, answer in history:
                    msgs.append({"role": "user", "content": user})
                    msgs.append({"role": "assistant", "content": answer})
                msgs.append({"role": "user", "content": t.text or ""})
            body["messages"] = msgs
        elif t.text is not None:
            body["prompt"] = (item.system or "") + "".join(u + a for u, a in history) + t.text
        else:
            body["prompt"] = flatten_messages(t.messages or ())
        return orjson.dumps(body)

    async def send(self, body: bytes, rec: Record, want_text: bool = False) -> str:
        """POST ``body``, stream the answer into ``rec``; returns the text if ``want_text``.

        Never raises for a failed request (the record says why), except cancellation.
        """
        chat = self.chat
        loads = orjson.loads
        times = rec.chunk_times
        tokens: list[int] = []
        parts: list[str] = []
        per_chunk_usage = False
        last_ct = 0
        finished = False
        t_send = perf_counter()
        rec.sent = t_send - self.t0
        try:
            async with self.session.post(self.api_url, data=body,
                                         headers=self.headers) as resp:
                rec.status = resp.status
                if resp.status != 200:
                    raw = await resp.content.read(_ERROR_BODY_BYTES)
                    rec.error = f"HTTP {resp.status}: {raw.decode('utf-8', 'replace').strip()}"
                    return ""
                content = resp.content
                buf = b""
                while True:
                    data = await content.readany()
                    if not data:
                        break
                    now = perf_counter() - t_send
                    if buf:
                        data = buf + data
                    if b"\r" in data:
                        data = data.replace(b"\r\n", b"\n")
                    events = data.split(b"\n\n")
                    buf = events.pop()
                    for ev in events:
                        if ev.startswith(b"data: ") and b"\n" not in ev:
                            payload: bytes | None = ev[6:]
                        else:
                            payload = _data_of(ev)
                        if payload is None:
                            continue
                        if payload == b"[DONE]":
                            finished = True
                            continue
                        obj = loads(payload)
                        carries = False
                        choices = obj.get("choices")
                        if choices:
                            c = choices[0]
                            if chat:
                                d = c.get("delta")
                                if d:
                                    txt = (d.get("content") or d.get("reasoning_content")
                                           or d.get("reasoning"))
                                    if txt:
                                        carries = True
                                        if want_text:
                                            parts.append(txt)
                                    elif d.get("tool_calls"):
                                        carries = True
                            else:
                                txt = c.get("text")
                                if txt:
                                    carries = True
                                    if want_text:
                                        parts.append(txt)
                            if c.get("finish_reason"):
                                finished = True
                        usage = obj.get("usage")
                        ntok = 0
                        if usage:
                            ct = usage.get("completion_tokens")
                            if ct is not None:
                                if choices:
                                    per_chunk_usage = True
                                    if ct > last_ct:
                                        ntok = ct - last_ct
                                        carries = True
                                last_ct = ct
                                rec.output_tokens = ct
                            pt = usage.get("prompt_tokens")
                            if pt is not None:
                                rec.prompt_tokens = pt
                            details = usage.get("prompt_tokens_details")
                            if details:
                                rec.cached_tokens = details.get("cached_tokens")
                        elif "error" in obj and not choices:
                            err = obj["error"]
                            msg = err.get("message", err) if isinstance(err, dict) else err
                            rec.error = f"error event in stream: {msg}"
                        if carries:
                            times.append(now)
                            tokens.append(ntok)
            if rec.error is None:
                if not times:
                    rec.error = "no output-bearing chunk in the stream"
                elif not finished:
                    rec.error = "stream ended early (no finish_reason and no [DONE])"
                else:
                    rec.ok = True
        except asyncio.CancelledError:
            rec.error = "cancelled"
            raise
        except TimeoutError:
            rec.error = "timeout"
        except aiohttp.ClientError as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
        except (orjson.JSONDecodeError, AttributeError, TypeError) as exc:
            rec.error = f"malformed stream event: {exc}"
        except OSError as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
        finally:
            rec.finished = perf_counter() - t_send
            rec.chunk_tokens = tokens if per_chunk_usage else None
        return "".join(parts)


def _data_of(event: bytes) -> bytes | None:
    """The data of a multi-line SSE event (comments, ``event:`` lines ignored)."""
    lines = [ln[5:].lstrip(b" ") for ln in event.split(b"\n") if ln.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(lines)


async def first_model(session: aiohttp.ClientSession, base_url: str,
                      headers: Mapping[str, str]) -> str:
    """The first model id listed at ``/v1/models``."""
    url = base_url.rstrip("/") + "/v1/models"
    try:
        async with session.get(url, headers=headers) as resp:
            if resp.status != 200:
                raise LoadgenError(f"GET {url} answered HTTP {resp.status}; pass --model")
            data = await resp.json(loads=orjson.loads, content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise LoadgenError(f"cannot reach {url}: {exc}") from exc
    models = data.get("data") if isinstance(data, dict) else None
    if not models:
        raise LoadgenError(f"GET {url} listed no models; pass --model")
    return str(models[0]["id"])
