"""The live recommendation: how many replicas each pool needs for the configured SLO.

pdlb sees every request's prompt, cached and output tokens (the access record, whether or
not the access log is written). Over ``window_s`` it measures the arrival rate and the
length mix, runs the same model and search as ``pdlb plan`` (lb/planner/model.py,
search.py) with the configured profile, and exports per pool, at scrape time:

* ``pdlb_pool_recommended_replicas{pool}``: the count to scale to (after hysteresis);
* ``pdlb_pool_model_replicas{pool}``: the model's count before hysteresis;
* ``pdlb_pool_replicas{pool}``: the backends the pool has now;
* ``pdlb_pool_utilisation{pool,resource}``: the model's load of the current pool
  (prefill ``compute`` = arrival x uncached tokens / saturated tokens/s; decode ``compute``
  = the step-time share of the decode fixed point, 1 = unstable; ``kv`` = mean KV in use /
  capacity; ``kv_link``);
* ``pdlb_planner_arrival_rate{kind}``: requests, prompt_tokens, uncached_prompt_tokens,
  output_tokens per second;
* ``pdlb_pool_server_capacity{pool,unit}``: what one server is assumed to do.

Hysteresis, for what the seed documents warn about:

* model-load time: the signal is demand (token arrival rates), not observed latency, so
  replicas that are still loading do not make it ask for more; going up is immediate;
* no flapping: a lower count is acted on only after it held ``scale_down_after_s``, and then
  the highest count seen in that window is used (Kubernetes' stabilisation window), and not
  before ``model_load_s + warmup_s`` after the last change (a new replica's cold prefix
  cache must not be read as the steady state);
* outstanding KV: the decode pool is never recommended below what its in-flight KV tokens
  need (``ceil(in flight / (0.9 x kv_capacity_tokens))``): a replica removed while holding
  sequences would drop or recompute them.

Nothing runs per request beyond appending one tuple to a bounded deque; every
``interval_s`` a background task copies the window and runs the model in a worker thread;
/metrics only reads the last result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from lb.accesslog import RequestRecord
from lb.errors import ConfigError
from lb.metrics import Metrics
from lb.planner.model import Model, SLOTarget
from lb.planner.profile import Profile, ProfileError, load
from lb.planner.search import smallest_decode, smallest_prefill
from lb.planner.settings import PlannerConfig
from lb.planner.workload import from_lengths

log = logging.getLogger("pdlb.planner")

POOLS = ("prefill", "decode")
KV_FILL = 0.9


class PoolView(Protocol):
    """What the recommender reads of a pool (lb.backends.pool.Pool has it)."""

    backends: list[Any]
    inflight_tokens: int


@dataclass
class _PoolState:
    recommended: int
    raw: int
    last_change: float
    lower_since: float | None = None
    highest_lower: int = 0
    utilisation: dict[str, float] = field(default_factory=dict)


class Recommender:
    def __init__(self, config: PlannerConfig, profile: Profile,
                 replicas: Callable[[str], int], outstanding_kv: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.profile = profile
        self.slo = SLOTarget(config.ttft_ms, config.tpot_ms, config.percentile)
        self._replicas = replicas
        self._outstanding_kv = outstanding_kv
        self._clock = clock
        self._events: deque[tuple[float, int, int, int]] = deque(maxlen=200_000)
        self.started = clock()
        self._evaluated = -math.inf
        self.rates: dict[str, float] = {"requests": 0.0, "prompt_tokens": 0.0,
                                        "uncached_prompt_tokens": 0.0, "output_tokens": 0.0}
        now = self.started
        self.pools = {name: _PoolState(max(config.min_replicas, replicas(name)),
                                       max(config.min_replicas, replicas(name)), now)
                      for name in POOLS}
        self.unknown_output = 0

    # -- the request path ------------------------------------------------------------------
    def observe(self, record: RequestRecord, status: int) -> None:
        """One finished request (the guard calls this with every access record)."""
        if status != 200:
            return
        usage = record.usage
        prompt = cached = output = None
        if usage is not None:
            prompt = usage.get("prompt_tokens")
            output = usage.get("completion_tokens")
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                cached = details.get("cached_tokens")
        if not isinstance(prompt, int):
            prompt = record.prompt_tokens
        if not isinstance(cached, int):
            cached = record.cached_tokens or 0
        if not isinstance(prompt, int) or not isinstance(output, int) or output < 1:
            self.unknown_output += 1  # a stream without usage: no output count to learn from
            return
        self._events.append((self._clock(), prompt, min(cached, max(prompt - 1, 0)), output))

    # -- every interval_s ------------------------------------------------------------------
    def refresh(self) -> None:
        """Recompute now if ``interval_s`` passed (all in the caller's thread)."""
        now = self._clock()
        if now - self._evaluated < self.config.interval_s:
            return
        snap = self.snapshot(now)
        self.apply(now, *self.compute(*snap))

    def snapshot(self, now: float) -> tuple[list[tuple[float, int, int, int]], float,
                                            dict[str, int], int]:
        """What the model needs, taken on the event loop (the deque is appended there)."""
        self._evaluated = now
        events = self._events
        while events and events[0][0] < now - self.config.window_s:
            events.popleft()
        span = min(self.config.window_s, max(now - self.started, 1e-9))
        current = {name: max(1, self._replicas(name)) for name in POOLS}
        return list(events), span, current, self._outstanding_kv()

    def compute(self, events: list[tuple[float, int, int, int]], span: float,
                current: dict[str, int], outstanding_kv: int
                ) -> tuple[dict[str, float], dict[str, int], dict[str, dict[str, float]], int]:
        """The model's counts and the current pools' load (pure: may run in a thread)."""
        n = len(events)
        rate = n / span
        rates = {
            "requests": rate,
            "prompt_tokens": sum(e[1] for e in events) / span,
            "uncached_prompt_tokens": sum(e[1] - e[2] for e in events) / span,
            "output_tokens": sum(e[3] for e in events) / span,
        }
        cfg = self.config
        raw = {name: cfg.min_replicas for name in POOLS}
        util: dict[str, dict[str, float]] = {name: {} for name in POOLS}
        if n and rate > 0:
            recent = events[-cfg.samples:]
            wl = from_lengths("pdlb traffic", [e[1] for e in recent], [e[3] for e in recent],
                              [e[2] for e in recent])
            model = Model(self.profile, wl, self.slo, samples=cfg.samples)
            n_d = smallest_decode(model, rate, cfg.max_replicas)
            n_d = n_d if n_d is not None else cfg.max_replicas
            n_p = smallest_prefill(model, rate, n_d, cfg.max_replicas)
            raw = {"prefill": max(cfg.min_replicas, n_p if n_p is not None else cfg.max_replicas),
                   "decode": max(cfg.min_replicas, n_d)}
            now_pred = model.disaggregated(rate, current["prefill"], current["decode"])
            util["prefill"]["compute"] = now_pred.utilisation.get("prefill", 0.0)
            util["decode"]["compute"] = model.decode_load(rate / current["decode"])
            util["decode"]["kv"] = now_pred.utilisation.get("kv", 0.0)
            util["decode"]["kv_link"] = now_pred.utilisation.get("kv_link", 0.0)
        kv_floor = math.ceil(outstanding_kv / (KV_FILL * self.profile.decode.kv_capacity_tokens))
        return rates, raw, util, kv_floor

    def apply(self, now: float, rates: dict[str, float], raw: dict[str, int],
              util: dict[str, dict[str, float]], kv_floor: int) -> None:
        self.rates = rates
        for name in POOLS:
            floor = kv_floor if name == "decode" else 0
            self._step(self.pools[name], min(self.config.max_replicas, raw[name]), floor, now)
            self.pools[name].utilisation = util[name]

    async def running(self, _app: object) -> AsyncIterator[None]:
        """An aiohttp cleanup context: recompute every ``interval_s`` (the model in a worker
        thread, so the event loop only copies the window)."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.config.interval_s)
                now = self._clock()
                try:
                    result = await asyncio.to_thread(self.compute, *self.snapshot(now))
                except Exception:  # a model bug must not stop the loop: log, keep the last
                    log.exception("planner: recomputing the recommendation failed")
                    continue
                self.apply(now, *result)

        task = asyncio.ensure_future(loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _step(self, st: _PoolState, raw: int, floor: int, now: float) -> None:
        cfg = self.config
        st.raw = raw
        if raw > st.recommended:
            st.recommended = raw
            st.last_change = now
            st.lower_since = None
            return
        if raw == st.recommended:
            st.lower_since = None
            return
        if st.lower_since is None:
            st.lower_since = now
            st.highest_lower = raw
        st.highest_lower = max(st.highest_lower, raw)
        settled = now - st.last_change >= cfg.model_load_s + cfg.warmup_s
        held = now - st.lower_since >= cfg.scale_down_after_s
        if settled and held:
            target = max(st.highest_lower, floor, cfg.min_replicas)
            if target < st.recommended:
                st.recommended = target
                st.last_change = now
            st.lower_since = None

    def recommended(self, pool: str) -> float:
        return float(self.pools[pool].recommended)

    def raw(self, pool: str) -> float:
        return float(self.pools[pool].raw)

    def utilisation(self, pool: str, resource: str) -> float:
        return self.pools[pool].utilisation.get(resource, 0.0)

    def rate(self, kind: str) -> float:
        return self.rates[kind]

    def current(self, pool: str) -> float:
        return float(self._replicas(pool))

    def export(self, metrics: Metrics) -> None:
        """Register the gauges (read at scrape time)."""
        prof = self.profile
        for pool in POOLS:
            labels = {"pool": pool}
            metrics.watch("pdlb_pool_recommended_replicas", "Replicas the planner recommends"
                          " for the configured SLO (after hysteresis).", labels,
                          partial(self.recommended, pool))
            metrics.watch("pdlb_pool_model_replicas", "Replicas the planner's model needs"
                          " now (before hysteresis).", labels, partial(self.raw, pool))
            metrics.watch("pdlb_pool_replicas", "Backends the pool has now.", labels,
                          partial(self.current, pool))
        for pool, resource in (("prefill", "compute"), ("decode", "compute"), ("decode", "kv"),
                               ("decode", "kv_link")):
            metrics.watch("pdlb_pool_utilisation", "The planner's model load of the pool as"
                          " it is (1 = saturated).", {"pool": pool, "resource": resource},
                          partial(self.utilisation, pool, resource))
        for kind in self.rates:
            metrics.watch("pdlb_planner_arrival_rate", "Arrivals per second over the"
                          " planner's window.", {"kind": kind},
                          partial(self.rate, kind))
        capacity = {("prefill", "prompt_tokens_per_s"): prof.prefill.saturated_tokens_per_s,
                    ("decode", "kv_tokens"): float(prof.decode.kv_capacity_tokens),
                    ("decode", "step_base_ms"): prof.decode.base_ms,
                    ("decode", "max_num_seqs"): float(prof.decode.max_num_seqs)}
        for (pool, unit), value in capacity.items():
            metrics.watch("pdlb_pool_server_capacity", "Per-server capacity the planner"
                          " assumes (from its profile).", {"pool": pool, "unit": unit},
                          partial(float, value))


def attach(config: PlannerConfig, metrics: Metrics, pools: Mapping[str, PoolView]
           ) -> Recommender:
    """Build the recommender (``[planner] enabled``) and register its gauges; the app sets
    ``guard.observer = rec.observe`` and runs ``rec.running`` as a cleanup context."""
    if config.profile is None:
        raise ConfigError("planner: enabled without a profile")
    try:
        profile = load(config.profile)
    except ProfileError as exc:
        raise ConfigError(f"planner.profile: {exc}") from None
    rec = Recommender(config, profile, lambda name: len(pools[name].backends),
                      lambda: pools["decode"].inflight_tokens)
    rec.export(metrics)
    return rec
