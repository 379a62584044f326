"""pdlb's own HTTP/1.1 front for the completion routes: the hot path without aiohttp's server.

Why: at one request at a time, aiohttp's server spends ~0.15-0.25 ms between the request's
bytes arriving and pdlb's handler running (a task hop, a Request object, routing,
middlewares) and more writing the answer's head — a third of what pdlb adds to TTFT. This
front parses the head of an ordinary request itself and runs the guard (lb/serve/guard.py:
access, checks, errors, counting — the same object aiohttp's handlers run) and the proxy
in one task.

Only the common case is served here: ``POST /v1/completions`` or ``/v1/chat/completions``,
HTTP/1.1, a whole head in one read, a ``Content-Length`` body within ``max_body_bytes``.
Anything else — other routes, HTTP/1.0, chunked bodies, ``Expect``, ``Upgrade``, odd,
split or oversized heads — hands the connection to aiohttp, with the bytes read so far, for
good (lb/serve/handoff.py); its answers (404, 405, 413, 400...) are the app's usual ones.
Keep-alive, pipelining (answers in order, with backpressure: see :class:`FrontProtocol`),
the client's ``Connection: close``, a slow body (408 after ``body_timeout_s``), idle
connections (closed after ``client_idle_timeout_s``, across a hand-off too), a client
leaving mid-request (the request is cancelled, so both legs are aborted) and draining on
shutdown behave as on aiohttp; tests/test_front_differential.py holds the two to it.

``[server] fast_front = false`` serves everything through aiohttp. The head parser is
lb/serve/requesthead.py; answers are written by lb/serve/rawside.py.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from aiohttp import web

from lb.config import Config
from lb.request import Endpoint
from lb.serve.guard import Guard
from lb.serve.handoff import hand_off
from lb.serve.rawside import RawSide
from lb.serve.requesthead import MAX_HEAD_BYTES, Head, parse_head

BODY_WAIT_LIMIT = 1 << 20
"""A body longer than this that does not arrive with its head is read by aiohttp."""
PIPELINE_BACKLOG = 1 << 16
"""Bytes read ahead of the request being served beyond which reading pauses (pipelining)."""


class Front:
    """What every front connection shares: the guard (which runs the proxy), limits and
    aiohttp's server."""

    def __init__(self, config: Config, guard: Guard, aiohttp_server: web.Server) -> None:
        self.guard = guard
        self.aiohttp_server = aiohttp_server
        server = config.server
        self.max_body = server.max_body_bytes
        self.body_timeout_s = server.body_timeout_s
        self.idle_s = server.client_idle_timeout_s
        self.connections: set[FrontProtocol] = set()
        self.closing = False
        self._changed: asyncio.Future[None] | None = None

    def protocol(self) -> FrontProtocol:
        return FrontProtocol(self)

    async def shutdown(self, drain_s: float) -> None:
        """Close idle connections now; let in-flight requests finish within ``drain_s``,
        then cancel them (their connections close once they end).

        A request whose body is still arriving is in flight too (aiohttp runs its handler
        from the head on, and drains it): it is served once the body is in, not dropped."""
        self.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_s
        for conn in list(self.connections):
            if conn.idle:
                conn.close()
        while (busy := [c for c in self.connections if not c.idle]) \
                and loop.time() < deadline:
            # Woken when a task ends, a body completes (a new task) or a connection goes.
            changed = self._changed = loop.create_future()
            tasks = [c.task for c in busy if c.task is not None]
            await asyncio.wait([changed, *tasks], timeout=deadline - loop.time(),
                               return_when=asyncio.FIRST_COMPLETED)
            self._changed = None
        late = [c.task for c in self.connections if c.task is not None]
        for conn in list(self.connections):
            if not conn.idle and conn.task is None:
                conn.close()  # its body never came in time
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)

    def changed(self) -> None:
        """A connection started a request or went away: a draining shutdown looks again."""
        waiter = self._changed
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class FrontProtocol(asyncio.Protocol):
    """One client connection, until (and unless) it is handed to aiohttp.

    Flow control: requests are served one at a time, in order. Bytes that arrive behind
    the request being served (pipelining) wait in ``_buf``; past :data:`PIPELINE_BACKLOG`
    of them reading pauses, and it resumes only once they are down to that again. The next
    pipelined request is not started while the client's transport is paused for writing
    (the client is not reading its answers): it starts when ``resume_writing`` comes. So
    a client that sends without reading holds at most the backlog, one request and the
    transport's write buffer in pdlb, and makes pdlb do no work beyond that.
    """

    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.peername: Any = None
        """The client's address (read once per connection, for the access log)."""
        self.task: asyncio.Task[None] | None = None
        self.writing_paused = False
        self.close_after = False
        self._buf = b""  # bytes read and not yet served, from _pos on (no copy per request)
        self._pos = 0
        self._head: Head | None = None  # a head whose body is still arriving
        self._parts: list[bytes] = []
        self._have = 0
        self._reading_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._done = self._served  # bound once, not per request

    @property
    def idle(self) -> bool:
        """Neither serving a request nor receiving one's body."""
        return self.task is None and self._head is None

    # -- connection events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.peername = transport.get_extra_info("peername")
        self.front.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.front.connections.discard(self)
        self._cancel_timer()
        if self.task is not None:
            self.task.cancel()  # the client left: abort both legs, free the budgets
        self._wake_drain(ConnectionResetError("the client went away"))
        if self.front.closing:
            self.front.changed()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake_drain(None)
        if self.task is None and self._pos < len(self._buf):
            # A pipelined request held while the client did not read: start it, outside
            # the transport's callback.
            self._loop.call_soon(self._serve_held)

    async def drain(self) -> None:
        if self.transport is None:
            raise ConnectionResetError("the client went away")
        if not self.writing_paused:
            return
        waiter = self._drain_waiter = self._loop.create_future()
        await waiter

    def _wake_drain(self, error: Exception | None) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def data_received(self, data: bytes) -> None:
        head = self._head
        if head is not None:  # the rest of a body
            self._parts.append(data)
            self._have += len(data)
            if self._have >= head.body_end:
                self._buf = b"".join(self._parts)
                self._pos = 0
                self._parts = []
                self._head = None
                self._start(head)  # parsed already: no second parse of the same head
                self._flow()
            return
        if self._pos < len(self._buf):
            # Behind a request being served (or held): the copy is bounded, since reading
            # pauses past PIPELINE_BACKLOG.
            self._buf = self._buf[self._pos:] + data
        else:
            self._buf = data  # the common case: one request per read, no copy
        self._pos = 0
        if self.task is None and not self.writing_paused:
            self._next()
        self._flow()

    def eof_received(self) -> bool:
        return False

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- requests
    def _next(self) -> None:
        """Start the request at ``_pos``, or wait for the rest of its body."""
        buf, pos = self._buf, self._pos
        if pos >= len(buf) or self.transport is None:
            return
        # parse_head reads a head at the start of its buffer: behind a served request, a
        # window just long enough for the longest head it accepts (a bounded copy).
        window = buf if pos == 0 else buf[pos:pos + MAX_HEAD_BYTES + 4]
        head = parse_head(window, self.front.max_body)
        if head is None:
            self._hand_off()
            return
        if len(buf) - pos < head.body_end:
            if head.body_end > BODY_WAIT_LIMIT:
                self._hand_off()
            else:
                self._wait_for_body(head)
            return
        self._start(head)

    def _start(self, head: Head) -> None:
        """Serve the request whose head and whole body start at ``_pos``."""
        buf, pos = self._buf, self._pos
        self._cancel_timer()
        body = buf[pos + head.body_start:pos + head.body_end]
        pos += head.body_end
        if pos < len(buf):
            self._pos = pos
        else:
            self._buf, self._pos = b"", 0
        self.close_after = head.close or self.front.closing
        side = RawSide(self, head.headers, body)
        self.task = self._loop.create_task(
            self.front.guard.serve(side, head.endpoint, self._done))
        if self.front.closing:
            self.front.changed()

    def _serve_held(self) -> None:
        """The client reads again: serve the pipelined request held meanwhile."""
        if (self.task is None and self._head is None and not self.writing_paused
                and self.transport is not None):
            self._next()
            self._flow()

    def _wait_for_body(self, head: Head) -> None:
        self._head = head
        self._parts = [self._buf[self._pos:] if self._pos else self._buf]
        self._have = len(self._parts[0])
        self._buf, self._pos = b"", 0
        self._cancel_timer()
        self._timer = self._loop.call_at(self._loop.time() + self.front.body_timeout_s,
                                         self._body_timeout)

    def _body_timeout(self) -> None:
        self._timer = None
        endpoint: Endpoint = self._head.endpoint if self._head is not None else "completions"
        self._head = None
        self._parts = []
        guard = self.front.guard
        guard.answered_early(RawSide(self, {}, b""), endpoint, guard.body_timeout(),
                             waited_s=guard.body_timeout_s)
        self.close()

    def _served(self) -> None:
        """The request's task is ending (the guard calls this last): close, or go on with
        the connection."""
        self.task = None
        if self.transport is not None:
            if self.close_after or self.front.closing:
                self.close()
            else:
                self._arm_idle()
                if not self.writing_paused:  # else resume_writing starts the next
                    self._next()
                self._flow()

    # -- hand-off to aiohttp
    def _hand_off(self) -> None:
        """From now on aiohttp's server owns this connection, starting with the bytes read
        (lb/serve/handoff.py); the idle deadline running now still holds."""
        transport = self.transport
        assert transport is not None and self.task is None
        timer = self._timer
        deadline = timer.when() if timer is not None else self._loop.time() + self.front.idle_s
        self._cancel_timer()
        self.front.connections.discard(self)
        buf = self._buf[self._pos:] if self._pos else self._buf
        self._buf, self._pos = b"", 0
        self.transport = None  # nothing of this protocol touches the connection again
        hand_off(transport, self.front.aiohttp_server(), buf,
                 writing_paused=self.writing_paused, reading_paused=self._reading_paused,
                 deadline=deadline)
        self._reading_paused = False

    # -- timers and flow control
    def _arm_idle(self) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_at(self._loop.time() + self.front.idle_s, self._idle)

    def _idle(self) -> None:
        self._timer = None
        if self.task is None:
            self.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _flow(self) -> None:
        """Read on while the bytes waiting behind the current request are few; else pause
        until they are served (the client's kernel buffers then push back on it)."""
        if len(self._buf) - self._pos > PIPELINE_BACKLOG:
            self._pause_reading()
        else:
            self._resume_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()


class FrontSite(web.BaseSite):
    """A site of aiohttp's runner whose listening socket accepts into the front; draining
    joins the runner's.

    Built on ``BaseSite`` as aiohttp's own ``TCPSite`` is: ``start()`` of the base registers
    the site with the runner, and the subclass sets ``_server``, the one attribute the base
    and the runner read back (to stop the site and for ``runner.addresses``) and that has no
    public setter."""

    def __init__(self, runner: web.AppRunner, front: Front, host: str, port: int, *,
                 backlog: int, reuse_port: bool | None, drain_s: float) -> None:
        super().__init__(runner, backlog=backlog)
        self.front = front
        self.host = host
        self.port = port
        self.backlog = backlog
        self.reuse_port = reuse_port
        self.drain_s = drain_s

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = await asyncio.get_running_loop().create_server(
            self.front.protocol, self.host, self.port, backlog=self.backlog,
            reuse_port=self.reuse_port)
        self._server = server
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await super().stop()  # stop accepting
        # The connections handed to aiohttp drain alongside the front's, on the same
        # deadline (the runner would start on them only after this one: meanwhile their
        # idle ones would take new requests, and the two drains would add up). The
        # runner's own pre_shutdown and shutdown then find nothing left to do; pdlb has no
        # on_shutdown hook that would need to run before the handlers finish.
        server = self.front.aiohttp_server
        server.pre_shutdown()
        await asyncio.gather(self.front.shutdown(self.drain_s), server.shutdown(self.drain_s))
