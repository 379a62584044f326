"""The emulated KV handshakes: KV holds on the prefill, pulls (or waits) from the decode.

Prefill side: a request finished with ``do_remote_decode`` leaves its KV blocks allocated
as a :class:`KvHold` for ``kv_lease_s`` (model seconds). ``POST /_emulator/kv/pull`` takes
the hold if it exists, has not expired or been pulled, and matches the engine id and the
prompt hash, then frees the blocks. ``POST /_emulator/kv/release`` frees a hold whose
decode was aborted (vLLM notifies the prefill the same way).

Decode side: :class:`KvPuller` calls that endpoint on ``remote_host:remote_port`` from the
params (``localhost`` is resolved to 127.0.0.1 here, whatever the resolver says).

The other connectors (see ``emulator/connectors/``) key holds by a transfer key (a
``transfer_id``, a bootstrap room, a P2P request id) and their decodes may arrive *before*
the prefill finished: ``POST /_emulator/kv/await`` waits up to ``wait_s`` for the hold to
appear (:meth:`HoldRegistry.wait_take`), which stands for "the decode registered and the
prefill pushes when it is done". A decode that gives up (aborted) releases the key; a hold
that arrives for a released key is freed at once (``kv_holds_released``).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

PullStatus = Literal["ok", "unknown", "reused", "expired", "engine_mismatch", "prompt_mismatch",
                     "timeout", "storage_miss", "wrong_decode"]
Gone = Literal["reused", "expired", "released"]

REQUIRED_PARAMS = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port")


@dataclass(slots=True)
class KvHold:
    request_id: str
    engine_id: str
    prompt_hash: int
    num_tokens: int
    blocks: int
    timer: asyncio.TimerHandle | None = None


class HoldRegistry:
    """The prefill's leased KV holds; ``on_free(blocks)`` gives blocks back to the engine."""

    def __init__(self, on_free: Callable[[int], None], memory: int = 4096) -> None:
        self._on_free = on_free
        self.holds: dict[str, KvHold] = {}
        self._gone: dict[str, Gone] = {}
        self._gone_order: deque[str] = deque()
        self._memory = memory
        self._waiters: dict[str, tuple[asyncio.Future[tuple[PullStatus, int]], str | None,
                                       int]] = {}
        self.expired_total = 0
        self.released_total = 0
        self.pulled_total = 0

    def __len__(self) -> int:
        return len(self.holds)

    @property
    def waiting(self) -> int:
        """Decodes waiting here for a hold that does not exist yet."""
        return len(self._waiters)

    def add(self, hold: KvHold, lease_wall_s: float) -> bool:
        """Hold ``hold`` for the lease; False if its key was released already (the caller
        then frees the blocks itself)."""
        if self._gone.get(hold.request_id) == "released":
            self.released_total += 1
            return False
        loop = asyncio.get_running_loop()
        hold.timer = loop.call_later(lease_wall_s, self._expire, hold.request_id)
        self.holds[hold.request_id] = hold
        waiter = self._waiters.pop(hold.request_id, None)
        if waiter is not None:
            future, engine_id, prompt_hash = waiter
            if not future.done():
                future.set_result(self.take(hold.request_id, engine_id, prompt_hash))
        return True

    def take(self, request_id: str, engine_id: str | None, prompt_hash: int
             ) -> tuple[PullStatus, int]:
        """Serve a pull: (status, tokens). Any pull of an existing hold frees it.
        ``engine_id`` None: the caller named no engine (the key alone identifies the KV)."""
        hold = self.holds.get(request_id)
        if hold is None:
            gone = self._gone.get(request_id)
            if gone is None:
                return "unknown", 0
            return ("reused" if gone == "released" else gone), 0
        if engine_id is not None and hold.engine_id != engine_id:
            return "engine_mismatch", 0  # a wrong engine never reads this hold
        self._drop(hold, "reused")
        self.pulled_total += 1
        if hold.prompt_hash != prompt_hash:
            return "prompt_mismatch", 0  # the blocks were read, but they are another prompt's
        return "ok", hold.num_tokens

    async def wait_take(self, key: str, engine_id: str | None, prompt_hash: int,
                        wait_s: float) -> tuple[PullStatus, int]:
        """Like :meth:`take`, but a key not seen yet is waited for up to ``wait_s``."""
        if key in self.holds or key in self._gone or key in self._waiters:
            return self.take(key, engine_id, prompt_hash)
        future: asyncio.Future[tuple[PullStatus, int]] = \
            asyncio.get_running_loop().create_future()
        self._waiters[key] = (future, engine_id, prompt_hash)
        try:
            return await asyncio.wait_for(future, wait_s)
        except TimeoutError:
            return "timeout", 0
        finally:
            current = self._waiters.get(key)
            if current is not None and current[0] is future:
                del self._waiters[key]

    def release(self, request_id: str, *, before_arrival: bool = False) -> bool:
        """Free a hold nobody will take. ``before_arrival``: the key may not be held yet
        (a concurrent decode gave up first): remember it, and free the hold when it comes."""
        hold = self.holds.get(request_id)
        if hold is None:
            if before_arrival and request_id not in self._gone:
                self._remember(request_id, "released")
            return False
        self._drop(hold, "reused")
        self.released_total += 1
        return True

    def clear(self) -> None:
        for hold in list(self.holds.values()):
            self._drop(hold, "expired")
        for future, _, _ in list(self._waiters.values()):
            if not future.done():
                future.set_result(("unknown", 0))
        self._waiters.clear()

    def _expire(self, request_id: str) -> None:
        hold = self.holds.get(request_id)
        if hold is not None:
            hold.timer = None
            self._drop(hold, "expired")
            self.expired_total += 1

    def _drop(self, hold: KvHold, why: Gone) -> None:
        del self.holds[hold.request_id]
        if hold.timer is not None:
            hold.timer.cancel()
        self._remember(hold.request_id, why)
        self._on_free(hold.blocks)

    def _remember(self, key: str, why: Gone) -> None:
        self._gone[key] = why
        self._gone_order.append(key)
        while len(self._gone_order) > self._memory:
            self._gone.pop(self._gone_order.popleft(), None)


@dataclass(frozen=True, slots=True)
class RemoteKv:
    """The decode's view of validated do_remote_prefill params."""

    engine_id: str
    request_id: str
    host: str
    port: int
    block_ids: Any
    num_tokens: int | None
    raw: dict[str, Any] = field(repr=False)

    @property
    def base_url(self) -> str:
        host = self.host
        if host in ("localhost", "0.0.0.0", "", "::"):
            host = "127.0.0.1"
        elif ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def parse_remote_params(params: dict[str, Any]) -> RemoteKv | None:
    """Validated pull parameters, or None where vLLM logs 'Got invalid KVTransferParams'."""
    if not params.get("remote_block_ids") or not all(p in params for p in REQUIRED_PARAMS):
        return None
    try:
        port = int(params["remote_port"])
    except (TypeError, ValueError):
        return None
    num = params.get("remote_num_tokens")
    return RemoteKv(
        engine_id=str(params["remote_engine_id"]),
        request_id=str(params["remote_request_id"]),
        host=str(params["remote_host"]),
        port=port,
        block_ids=params["remote_block_ids"],
        num_tokens=num if isinstance(num, int) and not isinstance(num, bool) else None,
        raw=params,
    )


_REMOTE_STATUSES = ("unknown", "reused", "expired", "engine_mismatch", "prompt_mismatch",
                    "timeout")


@dataclass(frozen=True, slots=True)
class PullOutcome:
    status: PullStatus | Literal["unreachable"]
    num_tokens: int = 0
    detail: str = ""


class KvPuller:
    """Decode-side client of the prefill's emulated side channel."""

    def __init__(self, session: Callable[[], aiohttp.ClientSession], timeout_wall_s: float):
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=max(timeout_wall_s, 2.0))
        self._background: set[asyncio.Task[None]] = set()

    async def pull(self, remote: RemoteKv, prompt_hash: int) -> PullOutcome:
        body = {
            "remote_request_id": remote.request_id,
            "remote_engine_id": remote.engine_id,
            "remote_block_ids": remote.block_ids,
            "prompt_hash": str(prompt_hash),
        }
        return await self._post_outcome(remote.base_url + "/_emulator/kv/pull", body,
                                        self._timeout)

    def release(self, remote: RemoteKv) -> None:
        """Tell the prefill to free a hold this decode will never pull (fire and forget)."""
        self.release_key(remote.base_url, remote.request_id, engine_id=remote.engine_id)

    def release_key(self, base_url: str, key: str, *, engine_id: str | None = None,
                    before_arrival: bool = False) -> None:
        """Fire and forget ``POST base_url/_emulator/kv/release`` for ``key``."""
        body: dict[str, Any] = {"remote_request_id": key, "before_arrival": before_arrival}
        if engine_id is not None:
            body["remote_engine_id"] = engine_id
        task = asyncio.get_running_loop().create_task(self._release(base_url, body))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, base_url: str, body: dict[str, Any]) -> None:
        try:
            async with self._session().post(
                base_url + "/_emulator/kv/release", json=body, timeout=self._timeout
            ) as resp:
                await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            pass  # best effort: the lease frees the blocks anyway

    async def await_kv(self, base_url: str, key: str, engine_id: str | None,
                       prompt_hash: int, wait_wall_s: float) -> PullOutcome:
        """``POST base_url/_emulator/kv/await``: take the hold ``key``, waiting for it."""
        body = {"key": key, "engine_id": engine_id, "prompt_hash": str(prompt_hash),
                "wait_s": wait_wall_s}
        timeout = aiohttp.ClientTimeout(total=wait_wall_s + (self._timeout.total or 2.0))
        return await self._post_outcome(base_url + "/_emulator/kv/await", body, timeout)

    async def get_json(self, url: str) -> Any:
        """GET a JSON document (a bootstrap server's /query); raises on any failure."""
        async with self._session().get(url, timeout=self._timeout) as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)

    async def _post_outcome(self, url: str, body: dict[str, Any],
                            limit: aiohttp.ClientTimeout) -> PullOutcome:
        try:
            async with self._session().post(url, json=body, timeout=limit) as resp:
                data = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            return PullOutcome("unreachable", detail=f"{type(exc).__name__}: {exc}")
        if not isinstance(data, dict):
            return PullOutcome("unreachable", detail="the side channel answered no JSON object")
        status = data.get("status")
        if status == "ok":
            return PullOutcome("ok", int(data.get("num_tokens", 0)))
        if status in _REMOTE_STATUSES:
            return PullOutcome(status)
        return PullOutcome("unreachable", detail=f"unexpected side-channel answer {data!r}")

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def transfer_time_s(num_tokens: int, bytes_per_token: int, latency_ms: float, gb_s: float) -> float:
    """Model seconds to move ``num_tokens`` of KV: latency + bytes / bandwidth."""
    if num_tokens <= 0:
        return 0.0
    return latency_ms / 1000.0 + num_tokens * bytes_per_token / (gb_s * 1e9)


def block_count(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size) if num_tokens > 0 else 0
