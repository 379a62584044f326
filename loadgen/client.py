"""The request side: build bodies, send them through the run's transport, fill records.

One transport (one connection pool) serves the whole run; see :mod:`loadgen.transport`.
The answer's SSE is parsed by :class:`loadgen.sse.StreamState`. aiohttp serves the small
control requests (``/v1/models``, ``/metrics``) and, on request, the streams too.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import aiohttp
import orjson

from loadgen.records import Record
from loadgen.sse import StreamState
from loadgen.transport import AiohttpTransport, FastTransport, Transport
from loadgen.workload import Item, Message

HTTP_CLIENTS = ("fast", "aiohttp")


class LoadgenError(Exception):
    """A run cannot start or go on (bad endpoint, unreachable server, failed preflight)."""


def make_session(limit: int, timeout_s: float) -> aiohttp.ClientSession:
    """A shared session; ``limit`` 0 means no client-side connection cap."""
    connector = aiohttp.TCPConnector(
        limit=limit, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=60,
        force_close=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 30.0)),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def request_headers(headers: Mapping[str, str] | None = None,
                    api_key: str | None = None) -> dict[str, str]:
    """Content type, bearer token (``api_key`` or $OPENAI_API_KEY) and extra headers."""
    out = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    key = api_key or os.environ.get("OPENAI_API_KEY")
    if key:
        out["Authorization"] = f"Bearer {key}"
    out.update(headers or {})
    return out


def make_transport(kind: str, api_url: str, headers: Mapping[str, str],
                   session: aiohttp.ClientSession | None = None) -> Transport:
    """``fast`` (raw keep-alive HTTP/1.1) or ``aiohttp`` (needs ``session``)."""
    if kind == "fast":
        return FastTransport(api_url, headers)
    if kind == "aiohttp":
        if session is None:
            raise ValueError("the aiohttp transport needs a session")
        return AiohttpTransport(session, api_url, headers)
    raise ValueError(f"unknown HTTP client {kind!r}: choose one of {', '.join(HTTP_CLIENTS)}")


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
    """Builds bodies for one endpoint and streams them through a transport."""

    def __init__(
        self,
        transport: Transport,
        *,
        endpoint: str,
        model: str,
        t0: float,
        ignore_eos: bool = True,
        continuous_usage: bool = True,
        extra_body: Mapping[str, Any] | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.transport = transport
        self.chat = endpoint == "chat"
        self.t0 = t0
        self.timeout_s = timeout_s
        stream_options: dict[str, Any] = {"include_usage": True}
        if continuous_usage:
            stream_options["continuous_usage_stats"] = True
        self.base: dict[str, Any] = {"model": model, "stream": True,
                                     "stream_options": stream_options}
        if ignore_eos:
            self.base["ignore_eos"] = True
        self.base.update(extra_body or {})

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

    def start(self, body: bytes, rec: Record, want_text: bool = False) -> Started:
        """Stamp ``rec.sent`` and hand the request to the transport, without yielding (the
        fast transport writes it at once on an idle pooled connection)."""
        t_send = perf_counter()
        rec.sent = t_send - self.t0
        state = StreamState(self.chat, t_send, want_text)
        try:
            pending: Any = self.transport.start(body, state.feed)
        except (OSError, ValueError) as exc:
            pending = exc
        return Started(rec, state, pending)

    async def finish(self, started: Started) -> str:
        """Wait for the answer of a started request; fill its record; the text if wanted.
        Never raises for a failed request (the record says why), except on cancellation."""
        rec, state = started.rec, started.state
        text = ""
        try:
            if isinstance(started.pending, BaseException):
                raise started.pending
            async with asyncio.timeout(self.timeout_s):
                status, err = await self.transport.wait(started.pending)
            rec.status = status
            if status != 200:
                rec.error = f"HTTP {status}: {err.decode('utf-8', 'replace').strip()}"
            else:
                text = state.finish(rec)
        except asyncio.CancelledError:
            rec.error = "cancelled"
            raise
        except TimeoutError:
            rec.error = f"timeout after {self.timeout_s:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
        finally:
            rec.finished = perf_counter() - state.t_send
        return text

    async def send(self, body: bytes, rec: Record, want_text: bool = False) -> str:
        """POST ``body`` and stream the answer into ``rec`` (TTFT runs from the send,
        connection set-up included)."""
        return await self.finish(self.start(body, rec, want_text))


@dataclass(slots=True)
class Started:
    """A request handed to the transport, its record and its stream's parser."""

    rec: Record
    state: StreamState
    pending: Any


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
