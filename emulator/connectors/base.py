"""What an emulated KV connector decides, and the sources a decode takes its KV from.

A connector mode (one module per connector in this package) looks at each request once,
when it is submitted, and returns a :class:`Plan`:

* ``produce`` — this request's KV must be staged when it finishes: held under ``key`` for
  the lease (a decode takes it through ``/_emulator/kv/pull|await``), or written to the
  shared store (``store``);
* ``consume`` — this request's prompt KV comes from elsewhere: a :class:`KvSource` the
  engine awaits after reserving the blocks (local compute if it fails);
* ``invalid`` — the request asked for a transfer with unusable parameters (vLLM logs "Got
  invalid KVTransferParams" and recomputes): the reason it is counted under.

Everything the engine counts (``external_kv_transfer`` vs ``local_compute`` tokens,
``kv_pulled``, ``kv_recomputed_by_reason``) is the same for every connector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from emulator.config import EmulatorConfig
from emulator.kv import KvPuller, PullOutcome
from emulator.protocol import GenRequest

LOOPBACK = ("localhost", "127.0.0.1", "0.0.0.0", "", "::", "::1")


@dataclass(frozen=True, slots=True)
class Produce:
    key: str
    """The hold's key: what the decode names (request id, transfer id, room, prompt hash)."""
    engine_id: str
    store: bool = False
    """Write to the shared store instead of holding blocks (shared_storage)."""


@dataclass(frozen=True, slots=True)
class Staged:
    """What a producer staged, for the kv_transfer_params of its answer."""

    key: str
    engine_id: str
    request_id: str
    block_ids: list[int]
    num_tokens: int
    cached_tokens: int


class KvSource(Protocol):
    """Where a decode's prompt KV comes from."""

    where: str
    """For logs: the address it is fetched from."""
    storage: bool
    """True for a shared store (hits/misses are counted as such)."""

    async def fetch(self, prompt_hash: int) -> PullOutcome:
        """The transfer; never raises (failures are outcomes)."""
        ...

    def release(self) -> None:
        """The decode was aborted before its KV came: let the producer free it."""
        ...


class ServerView(Protocol):
    """The parts of an engine a connector mode reads."""

    config: EmulatorConfig
    engine_id: str
    advertised_port: int | None
    puller: KvPuller | None


@dataclass(frozen=True, slots=True)
class Plan:
    produce: Produce | None = None
    consume: KvSource | None = None
    invalid: str | None = None


NO_PLAN = Plan()


class KvMode(Protocol):
    name: str

    def plan(self, req: GenRequest) -> Plan: ...

    def response_params(self, staged: Staged) -> dict[str, Any] | None:
        """The kv_transfer_params of a producer's answer (None: the field stays null)."""
        ...


@runtime_checkable
class KvStore(Protocol):
    """A mode whose producers write a shared store instead of holding blocks."""

    def write(self, key: str, num_tokens: int) -> None: ...


def engine_id_of(server: ServerView, dp_rank: int) -> str:
    """vLLM gives each data-parallel rank its own engine id."""
    if server.config.data_parallel_size == 1:
        return server.engine_id
    return f"{server.engine_id}_dp{dp_rank}"


def http_base(host: str, port: int | str) -> str:
    """``http://host:port`` with loopback names made 127.0.0.1 (as kv.RemoteKv does)."""
    host = host.strip("[]")
    if host in LOOPBACK:
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def wait_wall_s(config: EmulatorConfig) -> float:
    return config.kv_wait_timeout_s / config.time_scale


class FixedOutcome:
    """A source whose answer is known without asking anyone (e.g. KV sent elsewhere)."""

    storage = False

    def __init__(self, outcome: PullOutcome, where: str) -> None:
        self.outcome = outcome
        self.where = where

    async def fetch(self, prompt_hash: int) -> PullOutcome:
        return self.outcome

    def release(self) -> None:
        pass


class AwaitSource:
    """A decode waiting for a producer's hold ``key`` at ``base_url`` (pushed KV, rooms)."""

    storage = False

    def __init__(self, puller: KvPuller, base_url: str, key: str, engine_id: str | None,
                 wait_s: float) -> None:
        self.puller = puller
        self.where = base_url
        self.key = key
        self.engine_id = engine_id
        self.wait_s = wait_s

    async def fetch(self, prompt_hash: int) -> PullOutcome:
        return await self.puller.await_kv(self.where, self.key, self.engine_id, prompt_hash,
                                          self.wait_s)

    def release(self) -> None:
        self.puller.release_key(self.where, self.key, engine_id=self.engine_id,
                                before_arrival=True)
