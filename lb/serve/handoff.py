"""Giving a connection that pdlb's front (lb/serve/front.py) has read from to aiohttp's server.

The front serves only ordinary completion requests; on anything else it hands the
connection, with the bytes read so far, to a fresh aiohttp ``RequestHandler`` for good. Two
things must survive the move:

* flow control: a transport paused for writing does not say so again, and a paused read must
  be resumed (aiohttp pauses and resumes on its own terms from then on);
* the idle deadline: ``[server] client_idle_timeout_s`` bounds a connection that is idle or
  stuck in an incomplete head. aiohttp starts its keep-alive timer afresh in
  ``connection_made``, so a client that waited almost the whole timeout before sending half
  a head would get the timeout twice. When the bytes handed over hold no complete head,
  :class:`_HeadWatch` stands between the transport and aiohttp's handler until the head's end
  arrives, and closes the connection at the front's deadline if it does not. aiohttp has no
  public way to give a new handler a shorter first wait; once a head is complete the
  handler is busy with a request, and its own timer restarts after the answer, as it should.
"""

from __future__ import annotations

import asyncio

from aiohttp.web import RequestHandler

_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")  # aiohttp's parser accepts bare LF line ends too


def _has_head_end(data: bytes) -> bool:
    return any(end in data for end in _HEAD_ENDS)


def hand_off(transport: asyncio.Transport, handler: RequestHandler, buf: bytes, *,
             writing_paused: bool, reading_paused: bool, deadline: float) -> None:
    """Make ``handler`` own ``transport`` from now on, starting with ``buf``; the connection
    is closed at ``deadline`` (loop time) unless a whole request head has arrived by then."""
    if _has_head_end(buf):
        transport.set_protocol(handler)
    else:
        transport.set_protocol(_HeadWatch(handler, transport, buf[-3:], deadline))
    handler.connection_made(transport)
    if writing_paused:  # the transport will not say it again: aiohttp must know
        handler.pause_writing()
    if reading_paused:
        transport.resume_reading()
    handler.data_received(buf)


class _HeadWatch(asyncio.Protocol):
    """Passes every event to aiohttp's handler; until a head's end arrives, keeps the front's
    idle deadline; then steps out of the way (``set_protocol``)."""

    def __init__(self, handler: RequestHandler, transport: asyncio.Transport, tail: bytes,
                 deadline: float) -> None:
        self._handler = handler
        self._transport = transport
        self._tail = tail
        self._timer = asyncio.get_running_loop().call_at(deadline, transport.close)

    def data_received(self, data: bytes) -> None:
        if _has_head_end(data) or _has_head_end(self._tail + data[:3]):
            self._timer.cancel()
            self._transport.set_protocol(self._handler)
        else:
            self._tail = (self._tail + data[-3:])[-3:]
        self._handler.data_received(data)

    def eof_received(self) -> bool:
        self._handler.eof_received()
        return False  # as aiohttp's handler: the transport closes

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        self._handler.connection_lost(exc)
