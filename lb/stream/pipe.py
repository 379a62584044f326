"""The one relay loop: the decode's body pieces → the SSE relay → the client's transport.

Whichever backend client opened the stream (lb/backends/upstream.py hands out one
:class:`~lb.backends.upstream.BodySource` for both), its body arrives through callbacks. Each
piece is run through the :class:`~lb.stream.relay.SSERelay` and, once the client side offers
its transport (:meth:`~lb.stream.port.ClientSide.direct`), written to it with its chunked
framing in one ``transport.write`` — inside the backend connection's ``data_received`` with
pdlb's HTTP/1.1 client. Relaying the usual way costs, per chunk, a future, a task wake-up, a
StreamReader copy and a chunked ``writelines``; here the handler coroutine (:meth:`Pipe.run`)
only wakes for the first piece, for backpressure, for a concurrent connector's usage fetch,
and at the end.

Timeouts (README, ``[server.timeouts]``): no body byte within ``first_byte_s`` of the head, or
a silence longer than ``idle_s`` while reading, ends the stream with :class:`TimeoutError`;
time spent paused (a slow client, a usage fetch) is not the decode's silence.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any

from lb.backends.upstream import BodySource
from lb.connectors.base import PrefillResult
from lb.errors import UpstreamError
from lb.stream.port import ClientSide
from lb.stream.relay import SSERelay

PIECE, DRAIN, SETTLE, RAW, END, GONE = range(6)
Event = tuple[int, Any]


class Pipe:
    """One stream's body → ``relay`` → the client, and the handler's side of it (:meth:`run`).

    Until :attr:`direct` is set (after the first piece went out through
    :meth:`ClientSide.write`, when the response uses chunked encoding), every piece is queued
    for the handler coroutine to write. Anything that needs an await — a piece to write the
    slow way, a full client buffer, a usage fetch (``settle``) — pauses the body and queues an
    event; reading resumes once the handler has worked through the queue.
    """

    __slots__ = ("_last", "_loop", "_queue", "_started", "_timer", "_waiter",
                 "blocked", "body", "client_protocol", "client_transport", "direct",
                 "first_byte_s", "got_data", "idle_s", "relay", "settle")

    def __init__(
        self, body: BodySource, relay: SSERelay,
        settle: Callable[[], Awaitable[PrefillResult]] | None, first_byte_s: float,
        idle_s: float,
    ) -> None:
        self.body = body
        self.relay = relay
        self.settle = settle
        """A concurrent connector's prefill, awaited when the final usage event arrives."""
        self.client_transport: asyncio.Transport | None = None
        self.client_protocol: Any = None
        self.direct = False
        self.blocked = False
        self.got_data = False
        self.first_byte_s = first_byte_s
        self.idle_s = idle_s
        self._loop = asyncio.get_running_loop()
        self._queue: collections.deque[Event] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._started = self._loop.time()
        self._last = self._started
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(
            self._started + first_byte_s, self._check_timeout)

    async def run(self, client: ClientSide, on_first: Callable[[], None]) -> None:
        """Relay the whole body to ``client``; ``on_first`` once the first piece went out.

        Returns once the body ended with ``[DONE]`` and everything is written (not the
        terminating chunk). Raises :class:`ConnectionResetError` when the client left, an
        lb.errors error when the body broke or ended early, :class:`TimeoutError` on a stall.
        """
        self.body.start(self._on_data, self._on_end)
        try:
            first = True
            while True:
                event: Event | None = await self._next()
                while event is not None:
                    kind, value = event
                    event = None
                    if kind == RAW:
                        event = self.process(value)
                    elif kind == PIECE:
                        await client.write(value)
                        if first:
                            first = False
                            on_first()
                            target = client.direct()
                            if target is not None:
                                self.go_direct(*target)
                    elif kind == DRAIN:
                        async with asyncio.timeout(self.idle_s):
                            await client.drain()
                    elif kind == SETTLE:
                        assert self.settle is not None
                        self.relay.prefill = await self.settle()
                        event = self.process(value)
                    elif kind == GONE:
                        raise ConnectionResetError("the client went away")
                    else:  # END
                        if value is not None:
                            raise value
                        await self._finish(client)
                        return
                self._unblock_if_idle()
        finally:
            self.close()

    async def _finish(self, client: ClientSide) -> None:
        """The body is all in: what the relay held back goes out; it must have had [DONE]."""
        tail = self.relay.flush()
        if tail:
            await client.write(tail)
        if not self.relay.saw_done:
            raise UpstreamError("decode stream ended before [DONE]", code="truncated_stream")

    def go_direct(self, transport: asyncio.Transport, protocol: Any) -> None:
        self.client_transport = transport
        self.client_protocol = protocol
        self.direct = True

    # -- callbacks from the body
    def _on_data(self, data: bytes) -> None:
        self._last = now = self._loop.time()
        if not self.got_data:
            # From now on the deadline is last data + idle_s: only ever later, so the timer
            # is re-armed lazily when it fires, never per chunk.
            self.got_data = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self._loop.call_at(now + self.idle_s, self._check_timeout)
        if self.blocked:
            self._push((RAW, data))
            return
        try:
            event = self.process(data)
        except Exception as exc:  # never let it escape into the transport's callback
            self._push((END, exc))
            self.body.close()
            return
        if event is not None:
            self.blocked = True
            self.body.pause()
            self._push(event)

    def _on_end(self, error: BaseException | None) -> None:
        self._push((END, error))

    def process(self, data: bytes) -> Event | None:
        """Relay one piece now, or say what the handler must do with it."""
        relay = self.relay
        if self.settle is not None and relay.prefill is None \
                and relay.may_hold_final_usage(data):
            return (SETTLE, data)
        data = relay.feed(data)
        if not data:
            return None
        if not self.direct:
            return (PIECE, data)
        transport = self.client_transport
        assert transport is not None
        if transport.is_closing():
            self.body.close()
            return (GONE, None)
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        if self.client_protocol.writing_paused:
            return (DRAIN, None)
        return None

    # -- the handler's side
    async def _next(self) -> Event:
        while not self._queue:
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    def _unblock_if_idle(self) -> None:
        """Resume reading once the handler has no queued event left."""
        if self.blocked and not self._queue:
            self.blocked = False
            self._last = self._loop.time()  # the idle clock restarts with reading
            self.body.resume()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _push(self, event: Event) -> None:
        self._queue.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_timeout(self) -> None:
        self._timer = None
        if self.blocked:  # waiting on the client or a usage fetch: not the decode's stall
            deadline = self._loop.time() + self.idle_s
        else:
            deadline = (self._last + self.idle_s) if self.got_data \
                else (self._started + self.first_byte_s)
            if self._loop.time() >= deadline:
                self._push((END, TimeoutError()))
                self.body.close()
                return
        self._timer = self._loop.call_at(deadline, self._check_timeout)
