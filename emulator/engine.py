"""The engine: one asyncio task per server stepping a vLLM-V1-like scheduler in model time.

Each step (like vLLM V1's scheduler) first gives every running sequence its next tokens
(one for a decoding sequence, a chunk for one still prefilling), then admits waiting
sequences while the step's token budget, ``max_num_seqs`` and the KV capacity allow. The
step then takes, in model seconds::

    step_base + n_decoding * per_seq + context_tokens * per_kv_token
              + prefill_tokens / prefill_tokens_per_s

and the task sleeps ``step / time_scale`` (against an absolute deadline, so Python overhead
does not accumulate). Every sequence that completed its tokens samples one new token; the
handlers waiting on it are woken through one future each, no task per token.

A long prefill chunk therefore stretches the step every running decode waits for: the
interference disaggregation removes. A decode-role server that pulls KV (see kv.py) does
no prefill compute for those requests: they wait for the transfer, off the step loop, and
join the batch as decodes.

KV accounting is in blocks: a sequence holds ``ceil(computed tokens / block_size)``; when
a running sequence cannot grow, the most recently admitted one is preempted (its blocks
freed, re-prefilled later, with prefix-cache help), as vLLM does.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import random
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from emulator.config import EmulatorConfig
from emulator.connectors import KvSource, KvStore, Produce, Staged, make_kv_mode
from emulator.faults import Faults
from emulator.kv import HoldRegistry, KvHold, KvPuller, block_count, transfer_time_s
from emulator.metrics import EngineMetrics
from emulator.prefix_cache import PrefixCache, block_hashes
from emulator.protocol import GenRequest
from emulator.tokens import EOS_ID, Tokenizer, mix64, prompt_digest

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
_EOS_SALT = 0x5DEECE66D


class Phase(enum.IntEnum):
    WAITING = 0
    PULLING = 1
    RUNNING = 2
    FINISHED = 3


@dataclass(eq=False, slots=True)
class Sequence:
    """One request inside the engine."""

    req: GenRequest
    prompt_len: int
    key: int
    stream: bool
    arrival: float
    output: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    phase: Phase = Phase.WAITING
    num_computed: int = 0
    blocks: int = 0
    hashes: list[int] | None = None
    cached_upto: int = 0  # prompt blocks already inserted in the prefix cache
    admitted: bool = False  # first admission done (prefill stats recorded)
    local_hit: int = 0
    external: int = 0
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens
    created_cache_tokens: int = 0
    remote: KvSource | None = None  # where the prompt's KV comes from (a remote prefill)
    produce: Produce | None = None  # stage the KV for a decode when finished
    kv_ready: bool = False  # KV arrived (or pull gave up): schedulable again
    pull_task: asyncio.Task[None] | None = None
    pull_answered: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    first_token_at: float | None = None
    last_token_at: float = 0.0
    waiter: asyncio.Future[None] | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_len + len(self.output)

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    async def wait(self) -> None:
        """Until the engine produced something new for this sequence (or finished it)."""
        if self.phase is Phase.FINISHED:
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiter = fut
        try:
            await fut
        finally:
            self.waiter = None

    def wake(self) -> None:
        fut = self.waiter
        if fut is not None and not fut.done():
            fut.set_result(None)


@dataclass
class EngineCounters:
    """What /_emulator/state reports (reset by POST /_emulator/reset)."""

    requests_total: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    requests_failed: int = 0
    requests_dropped: int = 0
    kv_pulled: int = 0
    kv_recomputed: int = 0
    kv_recomputed_by_reason: dict[str, int] = field(default_factory=dict)
    kv_pull_failed: int = 0
    kv_held_total: int = 0
    kv_storage_writes: int = 0
    kv_storage_hits: int = 0
    kv_storage_misses: int = 0
    preemptions: int = 0
    steps: int = 0
    model_time_s: float = 0.0
    generated_tokens: int = 0


class Engine:
    """The scheduler, performance model and KV bookkeeping of one emulated vLLM engine."""

    def __init__(
        self,
        config: EmulatorConfig,
        tokenizer: Tokenizer,
        metrics: EngineMetrics,
        faults: Faults,
        puller: KvPuller | None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.faults = faults
        self.puller = puller
        self.engine_id = config.engine_id or str(uuid.uuid4())
        self.counters = EngineCounters()
        self.connector = config.role in ("prefill", "decode")
        self.total_blocks = config.kv_total_blocks
        self.used_blocks = 0
        self.waiting: deque[Sequence] = deque()
        self.ready: deque[Sequence] = deque()  # pulled (or given up) remote-KV sequences
        self.running: list[Sequence] = []
        self.pulling: set[Sequence] = set()
        self.prefix_cache = PrefixCache(self.total_blocks)
        self.holds = HoldRegistry(self.free_blocks)
        self.advertised_port: int | None = config.side_channel_port
        self._next_block_id = 1
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._scale = config.time_scale
        self._words = tokenizer.word_token_ids
        self._word_texts = tokenizer.word_texts
        self._seed_key = mix64(config.seed & _MASK64)
        self._eos_threshold = int(config.eos_probability * (1 << 64))
        self.rng = random.Random(config.seed)
        self.kv_mode = make_kv_mode(self)

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="emulator-engine")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        pulls = [s.pull_task for s in self.pulling if s.pull_task is not None]
        for seq in [*self.waiting, *self.ready, *self.running, *self.pulling]:
            self._finish(seq, "abort", error="server shutting down")
        if pulls:
            await asyncio.gather(*pulls, return_exceptions=True)
        self.holds.clear()
        if self.puller is not None:
            await self.puller.aclose()

    def reset(self) -> None:
        """Clear counters, faults, the prefix cache and holds (running requests continue)."""
        self.counters = EngineCounters()
        self.faults.restore(self.config)
        self.prefix_cache.clear()
        self.holds.clear()
        self.rng = random.Random(self.config.seed)

    # --- requests ------------------------------------------------------------------------

    def submit(self, req: GenRequest) -> Sequence:
        loop = asyncio.get_running_loop()
        prompt = req.prompt_ids
        key = mix64(self._seed_key ^ prompt_digest(prompt))
        seq = Sequence(req=req, prompt_len=len(prompt), key=key, stream=req.stream,
                       arrival=loop.time())
        if self.connector:
            plan = self.kv_mode.plan(req)
            seq.produce = plan.produce
            seq.remote = plan.consume
            if plan.invalid is not None:
                self._count_recompute(plan.invalid)
        self.waiting.append(seq)
        self._wake.set()
        return seq

    def abort(self, seq: Sequence, *, client_gone: bool = True) -> None:
        """Stop a sequence and free everything now, like vLLM's abort.

        ``client_gone`` counts it in requests_aborted (the client disconnected); the
        emulator's own fault injection passes False.
        """
        if seq.phase is Phase.FINISHED:
            return
        if client_gone:
            self.counters.requests_aborted += 1
        self._finish(seq, "abort")

    def free_blocks(self, blocks: int) -> None:
        self.used_blocks -= blocks
        self._wake.set()

    # --- the step loop -------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            batch = self._schedule()
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            step_s = self._step_time(batch)
            deadline = max(deadline, loop.time()) + step_s / self._scale
            # Always yield, even when behind schedule: the handlers must get to write.
            await asyncio.sleep(max(deadline - loop.time(), 0.0))
            self.counters.steps += 1
            self.counters.model_time_s += step_s
            self._apply(batch, step_s)

    def _schedule(self) -> list[tuple[Sequence, int]]:
        cfg = self.config
        bs = cfg.block_size
        budget = cfg.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(seq.total_tokens - seq.num_computed, budget)
            need = max(0, math.ceil((seq.num_computed + n) / bs) - seq.blocks)
            while need > self.total_blocks - self.used_blocks:
                victim = running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.phase is not Phase.RUNNING:
                break  # preempted itself; everything after it already was
            seq.blocks += need
            self.used_blocks += need
            batch.append((seq, n))
            budget -= n
            i += 1
        # Remote-KV sequences whose transfer ended already hold their blocks.
        while self.ready and budget > 0 and len(running) < cfg.max_num_seqs:
            seq = self.ready.popleft()
            n = min(seq.total_tokens - seq.num_computed, budget)
            need = max(0, math.ceil((seq.num_computed + n) / bs) - seq.blocks)
            if need > self.total_blocks - self.used_blocks:
                self.ready.appendleft(seq)
                break
            seq.blocks += need
            self.used_blocks += need
            seq.phase = Phase.RUNNING
            running.append(seq)
            batch.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            if seq.hashes is None:
                seq.hashes = block_hashes(seq.req.prompt_ids, bs, seq.req.cache_salt)
            hit = self.prefix_cache.match(seq.hashes, seq.total_tokens, bs)
            if seq.remote is not None and not seq.admitted:
                need = block_count(seq.prompt_len, bs)
                if need > self.total_blocks - self.used_blocks:
                    break
                self.waiting.popleft()
                seq.blocks = need
                self.used_blocks += need
                self._record_admission(seq, hit)
                self._start_pull(seq)
                continue
            n = min(seq.total_tokens - hit, budget)
            need = math.ceil((hit + n) / bs)
            if need > self.total_blocks - self.used_blocks:
                break
            self.waiting.popleft()
            if not seq.admitted:
                self._record_admission(seq, hit)
                self._count_source("local_compute", seq.prompt_len - hit)
            seq.num_computed = hit
            seq.blocks = need
            self.used_blocks += need
            seq.phase = Phase.RUNNING
            running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def _step_time(self, batch: list[tuple[Sequence, int]]) -> float:
        cfg = self.config
        decoding = 0
        context = 0
        prefill = 0
        for seq, n in batch:
            if n == 1 and seq.num_computed > 0:
                decoding += 1
                context += seq.num_computed
            else:
                prefill += n
        return (
            cfg.step_base_ms / 1e3
            + decoding * cfg.decode_per_seq_ms / 1e3
            + context * cfg.decode_per_kv_token_us / 1e6
            + prefill / cfg.prefill_tokens_per_s
        )

    def _apply(self, batch: list[tuple[Sequence, int]], step_s: float) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        bs = self.config.block_size
        metrics = self.metrics
        produced = 0
        later = 0  # tokens after a sequence's first: each one saw step_s of ITL
        for seq, n in batch:
            if seq.phase is not Phase.RUNNING:
                continue  # aborted or preempted while the step ran
            seq.num_computed += n
            hashes = seq.hashes
            if hashes is not None:
                full = min(seq.num_computed, seq.prompt_len) // bs
                if full > seq.cached_upto:
                    new = hashes[seq.cached_upto : full]
                    self.prefix_cache.insert(
                        new, max(self.total_blocks - self.used_blocks, len(new)),
                        parent=hashes[seq.cached_upto - 1] if seq.cached_upto else None,
                        token_ids=seq.req.prompt_ids[seq.cached_upto * bs : full * bs],
                        block_size=bs)
                    seq.cached_upto = full
            if seq.num_computed < seq.total_tokens:
                continue  # a prefill chunk that did not finish the prompt
            self._sample(seq)
            produced += 1
            if seq.first_token_at is None:
                seq.first_token_at = now
                metrics.time_to_first_token.observe((now - seq.arrival) * self._scale)
                seq.created_cache_tokens = max(
                    0, (seq.prompt_len // bs) * bs - (seq.local_hit + seq.external)
                )
            else:
                later += 1
            seq.last_token_at = now
            if seq.finish_reason is not None:
                self._finish(seq, seq.finish_reason)
            elif seq.stream:
                seq.wake()
        if later:
            metrics.inter_token_latency.observe_n(step_s, later)
        if produced:
            metrics.generation_tokens.inc(produced)
            self.counters.generated_tokens += produced

    def _sample(self, seq: Sequence) -> None:
        """Append the next output token and decide whether the sequence is finished."""
        req = seq.req
        pos = len(seq.output)
        h = mix64((seq.key + pos) & _MASK64)
        eos = False
        if (pos == 0 and seq.produce is not None and self.faults.stop_after_first_token) or (
            self._eos_threshold
            and not req.ignore_eos
            and pos >= req.min_tokens
            and mix64(h ^ _EOS_SALT) < self._eos_threshold
        ):
            eos = True
        if eos:
            seq.output.append(EOS_ID)
            seq.texts.append("")
            seq.finish_reason = "stop"
            return
        word = h & 127
        token = self._words[word]
        text = self._word_texts[word]
        seq.output.append(token)
        if pos >= req.min_tokens:
            if token in req.stop_token_ids:
                seq.texts.append(text)
                seq.finish_reason, seq.stop_reason = "stop", token
                return
            if req.stop and self._hit_stop(seq, text):
                return
        seq.texts.append(text)
        if len(seq.output) >= req.max_tokens or seq.total_tokens >= self.config.max_model_len:
            seq.finish_reason = "length"

    def _hit_stop(self, seq: Sequence, text: str) -> bool:
        tail = "".join(seq.texts[-8:])
        window = tail + text
        for stop in seq.req.stop:
            at = window.find(stop)
            if at < 0 or at + len(stop) <= len(tail):
                continue  # no match, or one inside text already emitted
            keep = at + (len(stop) if seq.req.include_stop_str_in_output else 0)
            seq.texts.append(window[len(tail) : max(keep, len(tail))])
            seq.finish_reason, seq.stop_reason = "stop", stop
            return True
        return False

    # --- admission, transfers, preemption, completion -------------------------------------

    def _record_admission(self, seq: Sequence, hit: int) -> None:
        seq.admitted = True
        seq.local_hit = hit
        m = self.metrics
        m.prefix_cache_queries.inc(seq.prompt_len)
        m.prefix_cache_hits.inc(hit)
        m.prompt_tokens.inc(seq.prompt_len)
        self._count_source("local_cache_hit", hit)

    def _count_source(self, source: str, tokens: int) -> None:
        if tokens > 0:
            self.metrics.prompt_tokens_by_source[source].inc(tokens)

    def _count_recompute(self, reason: str) -> None:
        c = self.counters
        c.kv_recomputed += 1
        c.kv_recomputed_by_reason[reason] = c.kv_recomputed_by_reason.get(reason, 0) + 1

    def _start_pull(self, seq: Sequence) -> None:
        seq.phase = Phase.PULLING
        self.pulling.add(seq)
        seq.pull_task = asyncio.get_running_loop().create_task(self._pull(seq))

    async def _pull(self, seq: Sequence) -> None:
        remote = seq.remote
        if remote is None:
            raise RuntimeError("a pull needs a KV source")
        cfg = self.config
        loop = asyncio.get_running_loop()
        started = loop.time()
        outcome = await remote.fetch(prompt_digest(seq.req.prompt_ids))
        seq.pull_answered = True
        if remote.storage:
            if outcome.status == "ok":
                self.counters.kv_storage_hits += 1
            else:
                self.counters.kv_storage_misses += 1
        to_load = seq.prompt_len - seq.local_hit
        if outcome.status == "ok":
            xfer = transfer_time_s(to_load, cfg.kv_bytes_per_token, cfg.kv_transfer_latency_ms,
                                   cfg.kv_transfer_bandwidth_gb_s)
            if xfer > 0:
                await asyncio.sleep(xfer / self._scale)
            self.metrics.nixl_xfer_time.observe(xfer)
            self.counters.kv_pulled += 1
            seq.external = to_load
            self._count_source("external_kv_transfer", to_load)
            seq.num_computed = seq.prompt_len - 1  # the last prompt token is recomputed
        elif (outcome.status in ("unreachable", "timeout")
              and cfg.kv_load_failure_policy == "fail"):
            if outcome.status == "unreachable":
                wait = cfg.kv_pull_timeout_s / self._scale - (loop.time() - started)
                if wait > 0:
                    await asyncio.sleep(wait)
            self.counters.kv_pull_failed += 1
            log.warning("KV transfer from %s failed: %s %s", remote.where, outcome.status,
                        outcome.detail)
            seq.pull_task = None  # finishing from inside the task: do not cancel it
            self._finish(seq, "error", error="Internal server error")
            return
        else:
            self._count_recompute(outcome.status)
            self._count_source("local_compute", to_load)
            seq.num_computed = seq.local_hit
        seq.cached_tokens = seq.local_hit + seq.external
        self.pulling.discard(seq)
        seq.phase = Phase.WAITING
        seq.kv_ready = True
        self.ready.append(seq)
        self._wake.set()

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.used_blocks -= seq.blocks
        seq.blocks = 0
        seq.num_computed = 0
        seq.phase = Phase.WAITING
        seq.kv_ready = False
        self.waiting.appendleft(seq)
        self.counters.preemptions += 1
        self.metrics.num_preemptions.inc()

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        phase = seq.phase
        if phase is Phase.FINISHED:
            return
        if phase is Phase.RUNNING:
            self.running.remove(seq)
        elif phase is Phase.PULLING:
            self.pulling.discard(seq)
            if seq.pull_task is not None and not seq.pull_task.done():
                seq.pull_task.cancel()
        elif phase is Phase.WAITING:
            if seq.kv_ready:
                _discard(self.ready, seq)
            else:
                _discard(self.waiting, seq)
        seq.phase = Phase.FINISHED
        seq.finish_reason = reason
        seq.error = error
        if reason == "abort" and seq.remote is not None and not seq.pull_answered:
            seq.remote.release()  # vLLM tells the prefill to free its blocks
        blocks, seq.blocks = seq.blocks, 0
        held, params = (self._maybe_hold(seq, blocks) if reason in ("length", "stop")
                        else (False, None))
        if not held:
            self.used_blocks -= blocks
        seq.kv_transfer_params = params
        if reason != "abort" and error is None:
            self.counters.requests_finished += 1
            self._apply_cached_tokens(seq)
            self.metrics.e2e_request_latency.observe(
                (asyncio.get_running_loop().time() - seq.arrival) * self._scale
            )
        self.metrics.request_success[reason].inc()
        self._wake.set()
        seq.wake()

    def _apply_cached_tokens(self, seq: Sequence) -> None:
        cached = seq.local_hit + seq.external
        params = seq.req.kv_transfer_params
        if (
            not self.config.decode_reports_transferred_as_cached
            and params
            and params.get("do_remote_prefill")
        ):
            remote_cached = params.get("remote_prefill_cached_tokens")
            if isinstance(remote_cached, int) and not isinstance(remote_cached, bool):
                cached = remote_cached  # vLLM 0.31+: the prefill's count, unchecked
        seq.cached_tokens = cached

    def _maybe_hold(self, seq: Sequence, blocks: int) -> tuple[bool, dict[str, Any] | None]:
        """The connector's request_finished on the prefill: stage the KV for a decode (hold
        the blocks, or write the shared store) and build the answer's params.
        Returns (blocks still held, kv_transfer_params)."""
        produce = seq.produce
        if produce is None or blocks == 0:
            return False, None
        if self.faults.omit_kv_params:
            return False, None
        if self.faults.stop_after_first_token and seq.finish_reason == "stop":
            return False, None
        num_tokens = seq.num_computed
        if produce.store:
            if isinstance(self.kv_mode, KvStore):
                self.kv_mode.write(produce.key, num_tokens)
                self.counters.kv_storage_writes += 1
            return False, None
        lease = self.config.kv_lease_s / self._scale
        held = self.holds.add(
            KvHold(request_id=produce.key, engine_id=produce.engine_id,
                   prompt_hash=prompt_digest(seq.req.prompt_ids), num_tokens=num_tokens,
                   blocks=blocks),
            lease,
        )
        if not held:
            return False, None  # the decode gave up already: the blocks were freed
        self.counters.kv_held_total += 1
        first = self._next_block_id
        n_ids = block_count(num_tokens, self.config.block_size)
        self._next_block_id = (first + n_ids) % max(self.total_blocks, 2) or 1
        return True, self.kv_mode.response_params(Staged(
            key=produce.key, engine_id=produce.engine_id, request_id=seq.req.engine_request_id,
            block_ids=list(range(first, first + n_ids)), num_tokens=num_tokens,
            cached_tokens=seq.local_hit + seq.external))

    # --- views ---------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.ready) + len(self.pulling)

    @property
    def kv_usage(self) -> float:
        return self.used_blocks / self.total_blocks if self.total_blocks else 0.0

    def update_gauges(self) -> None:
        m = self.metrics
        m.num_requests_running.set(self.num_running)
        m.num_requests_waiting.set(self.num_waiting)
        m.kv_cache_usage_perc.set(self.kv_usage)

    def text_of(self, seq: Sequence) -> str:
        return "".join(seq.texts)


def _discard(queue: deque[Sequence], seq: Sequence) -> None:
    with contextlib.suppress(ValueError):
        queue.remove(seq)

