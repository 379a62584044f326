"""The zero-await relay: the decode's body pieces → the SSE relay → the client's transport,
inside the backend connection's ``data_received``.

Relaying a streamed answer the usual way costs, per chunk, a future, a task wake-up, a
StreamReader copy and a chunked ``writelines`` on the way out. Here each decoded body piece is
run through the relay and written to the client's transport with its chunked framing in one
``transport.write``; the handler coroutine only wakes for the first piece, for backpressure,
for a concurrent connector's usage fetch, and at the end.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

from lb.backends.upstream import BodySource

PIECE, DRAIN, SETTLE, RAW, END, GONE = range(6)
Event = tuple[int, Any]


class Pipe:
    """Body pieces → ``transform`` → the client's transport, inside ``data_received``.

    Until :attr:`direct` is set (after the first piece went out through aiohttp, when the
    response uses chunked encoding), every piece is queued for the handler coroutine to
    write. Anything that needs an await — a piece to write the slow way, a full client
    buffer, a usage fetch (``needs_settle``) — pauses the upstream and queues an event;
    reading resumes once the handler has worked through the queue.
    """

    __slots__ = ("_last", "_loop", "_queue", "_started", "_timer", "_waiter",
                 "blocked", "client_protocol", "client_transport", "direct", "done_marker",
                 "first_byte_s", "got_data", "idle_s", "needs_settle", "response",
                 "transform")

    def __init__(
        self, response: BodySource, transform: Callable[[bytes], bytes] | None,
        needs_settle: Callable[[bytes], bool] | None, first_byte_s: float, idle_s: float,
    ) -> None:
        self.response = response
        self.transform = transform
        self.needs_settle = needs_settle
        self.client_transport: asyncio.Transport | None = None
        self.client_protocol: Any = None
        self.direct = False
        self.blocked = False
        self.done_marker = False  # saw "data: [DONE]" (when there is no transform)
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

    def start(self) -> None:
        self.response.start(self._on_data, self._on_end)

    def go_direct(self, transport: asyncio.Transport, protocol: Any) -> None:
        self.client_transport = transport
        self.client_protocol = protocol
        self.direct = True

    # -- callbacks from the connection
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
            self.response.close()
            return
        if event is not None:
            self.blocked = True
            self.response.pause()
            self._push(event)

    def _on_end(self, error: BaseException | None) -> None:
        self._push((END, error))

    def process(self, data: bytes) -> Event | None:
        """Relay one piece now, or say what the handler must do with it."""
        if self.needs_settle is not None and self.needs_settle(data):
            return (SETTLE, data)
        if self.transform is not None:
            data = self.transform(data)
            if not data:
                return None
        elif not self.done_marker and b"data: [DONE]" in data:
            self.done_marker = True
        if not self.direct:
            return (PIECE, data)
        transport = self.client_transport
        assert transport is not None
        if transport.is_closing():
            self.response.close()
            return (GONE, None)
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        if self.client_protocol.writing_paused:
            return (DRAIN, None)
        return None

    # -- the handler's side
    async def next(self) -> Event:
        while not self._queue:
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    def unblock_if_idle(self) -> None:
        """Resume reading once the handler has no queued event left."""
        if self.blocked and not self._queue:
            self.blocked = False
            self._last = self._loop.time()  # the idle clock restarts with reading
            self.response.resume()

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
                self.response.close()
                return
        self._timer = self._loop.call_at(deadline, self._check_timeout)

