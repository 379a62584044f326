"""aiohttp's streamed response behind the same callbacks as pdlb's HTTP/1.1 client.

The relay (lb/stream/pipe.py) is written once, against callbacks: a body piece arrived, the
body ended. pdlb's own client calls them from ``data_received``; aiohttp hands a body out
through an awaited StreamReader instead, so this adapter runs one reader task that awaits each
piece (``iter_any``: whatever arrived, never re-chunked) and calls ``on_data`` with it.

Pausing stops the task between pieces; aiohttp's StreamReader then fills to its high-water
mark and stops reading the socket, which is the backpressure the backend feels. Closing
closes the connection (never releases it to the pool): that is what makes vLLM abort the
request and free its KV. Errors reach ``on_end`` already translated (lb/backends/translate.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import aiohttp

from lb.backends.translate import translate


class AiohttpStream:
    """One aiohttp response whose head arrived (status < 400); its body via callbacks."""

    __slots__ = ("_closed", "_paused", "_resp", "_resumed", "_task", "_what", "headers",
                 "status")

    def __init__(self, resp: aiohttp.ClientResponse, what: str) -> None:
        self._resp = resp
        self._what = what
        self.status: int = resp.status
        self.headers: Mapping[str, str] = resp.headers
        self._task: asyncio.Task[None] | None = None
        self._paused = False
        self._resumed: asyncio.Future[None] | None = None
        self._closed = False
        """Closed by the consumer, or the body ended: either way no more callbacks."""

    def start(self, on_data: Callable[[bytes], None],
              on_end: Callable[[BaseException | None], None]) -> None:
        """Deliver each body piece to ``on_data``, then ``on_end(None | lb.errors error)``."""
        if self._task is not None:
            raise RuntimeError("the body was already started")
        if self._closed:
            return
        self._task = asyncio.get_running_loop().create_task(self._read(on_data, on_end))

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        waiter = self._resumed
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """Abandon the body: the connection is closed (a finished one is released already)."""
        if self._closed:
            return
        self._closed = True
        self._resp.close()
        task = self._task
        # From inside on_data the reader task notices _closed itself when it returns.
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    async def _read(self, on_data: Callable[[bytes], None],
                    on_end: Callable[[BaseException | None], None]) -> None:
        resp = self._resp
        try:
            async for data in resp.content.iter_any():
                on_data(data)
                while self._paused and not self._closed:
                    waiter = self._resumed = asyncio.get_running_loop().create_future()
                    try:
                        await waiter
                    finally:
                        self._resumed = None
                if self._closed:
                    return
        except asyncio.CancelledError:
            if self._closed:
                return  # our own close(): nothing to report
            self._closed = True
            resp.close()
            raise
        except Exception as exc:
            if self._closed:
                return
            self._closed = True
            resp.close()
            on_end(translate(exc, self._what))
            return
        if self._closed:
            return
        self._closed = True
        resp.release()
        on_end(None)
