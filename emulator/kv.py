"""The emulated NixlConnector handshake: KV holds on the prefill, pulls from the decode.

Prefill side: a request finished with ``do_remote_decode`` leaves its KV blocks allocated
as a :class:`KvHold` for ``kv_lease_s`` (model seconds). ``POST /_emulator/kv/pull`` takes
the hold if it exists, has not expired or been pulled, and matches the engine id and the
prompt hash, then frees the blocks. ``POST /_emulator/kv/release`` frees a hold whose
decode was aborted (vLLM notifies the prefill the same way).

Decode side: :class:`KvPuller` calls that endpoint on ``remote_host:remote_port`` from the
params (``localhost`` is resolved to 127.0.0.1 here, whatever the resolver says).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

PullStatus = Literal["ok", "unknown", "reused", "expired", "engine_mismatch", "prompt_mismatch"]

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
        self._gone: dict[str, Literal["reused", "expired"]] = {}
        self._gone_order: deque[str] = deque()
        self._memory = memory
        self.expired_total = 0
        self.released_total = 0
        self.pulled_total = 0

    def __len__(self) -> int:
        return len(self.holds)

    def add(self, hold: KvHold, lease_wall_s: float) -> None:
        loop = asyncio.get_running_loop()
        hold.timer = loop.call_later(lease_wall_s, self._expire, hold.request_id)
        self.holds[hold.request_id] = hold

    def take(self, request_id: str, engine_id: str, prompt_hash: int) -> tuple[PullStatus, int]:
        """Serve a pull: (status, tokens). Any pull of an existing hold frees it."""
        hold = self.holds.get(request_id)
        if hold is None:
            return self._gone.get(request_id, "unknown"), 0
        if hold.engine_id != engine_id:
            return "engine_mismatch", 0  # a wrong engine never reads this hold
        self._drop(hold, "reused")
        self.pulled_total += 1
        if hold.prompt_hash != prompt_hash:
            return "prompt_mismatch", 0  # the blocks were read, but they are another prompt's
        return "ok", hold.num_tokens

    def release(self, request_id: str) -> bool:
        hold = self.holds.get(request_id)
        if hold is None:
            return False
        self._drop(hold, "reused")
        self.released_total += 1
        return True

    def clear(self) -> None:
        for hold in list(self.holds.values()):
            self._drop(hold, "expired")

    def _expire(self, request_id: str) -> None:
        hold = self.holds.get(request_id)
        if hold is not None:
            hold.timer = None
            self._drop(hold, "expired")
            self.expired_total += 1

    def _drop(self, hold: KvHold, why: Literal["reused", "expired"]) -> None:
        del self.holds[hold.request_id]
        if hold.timer is not None:
            hold.timer.cancel()
        self._gone[hold.request_id] = why
        self._gone_order.append(hold.request_id)
        while len(self._gone_order) > self._memory:
            self._gone.pop(self._gone_order.popleft(), None)
        self._on_free(hold.blocks)


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
        try:
            async with self._session().post(
                remote.base_url + "/_emulator/kv/pull", json=body, timeout=self._timeout
            ) as resp:
                data = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            return PullOutcome("unreachable", detail=f"{type(exc).__name__}: {exc}")
        if not isinstance(data, dict):
            return PullOutcome("unreachable", detail="the side channel answered no JSON object")
        status = data.get("status")
        if status == "ok":
            return PullOutcome("ok", int(data.get("num_tokens", 0)))
        if status in ("unknown", "reused", "expired", "engine_mismatch", "prompt_mismatch"):
            return PullOutcome(status)
        return PullOutcome("unreachable", detail=f"unexpected side-channel answer {data!r}")

    def release(self, remote: RemoteKv) -> None:
        """Tell the prefill to free a hold this decode will never pull (fire and forget)."""
        task = asyncio.get_running_loop().create_task(self._release(remote))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, remote: RemoteKv) -> None:
        body = {"remote_request_id": remote.request_id, "remote_engine_id": remote.engine_id}
        try:
            async with self._session().post(
                remote.base_url + "/_emulator/kv/release", json=body, timeout=self._timeout
            ) as resp:
                await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            pass  # best effort: the lease frees the blocks anyway

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
