"""The queueing model: predicted TTFT/TPOT percentiles of a fleet at an arrival rate.

Arrivals are Poisson at ``rate`` requests/s and spread evenly over a pool's servers (pdlb's
``least_tokens`` keeps them close to a pooled queue). Per request ``i`` (a (prompt, cached,
output) sample of the workload), with the server coefficients of :mod:`lb.planner.profile`:

Disaggregated, ``n_p`` prefill + ``n_d`` decode servers
  * Prefill pool = M/G/c, c = n_p: work per request ``S_i = uncached_i / R_sat`` (saturated
    chunked throughput). Utilisation ``rho_p = rate E[S] / n_p``. Waiting time: Erlang C
    with the Allen-Cunneen correction, ``P(wait) = C(c, rate E[S])`` and, given a wait,
    exponential with rate ``(c / E[S] - rate) * 2 / (1 + scv(S))``.
  * Decode server (rate / n_d arrivals): Little's law with the step model gives the mean
    running count ``N = A b / (1 - A k)`` where ``A`` = arrivals/s x E[output], ``b`` = base
    step, ``k`` = per-sequence + per-KV-token x mean context (output-weighted); ``A k >= 1``
    is an unstable decode (ITL grows without bound).
  * TTFT_i = wait + ``alone_s(uncached_i)`` + KV transfer (latency + bytes / bandwidth,
    stretched by 1 / (1 - link utilisation)) + 2 decode steps: the decode's scheduler sees
    the request at a step boundary (half a step on average), starts the pull, takes the
    pulled request in at the next boundary (half a step) and runs its step.
  * TPOT_i = one decode step with ``1 + N + z sqrt(2/3 N)`` sequences (an arrival sees a
    Poisson(N) batch, PASTA; averaged over its own lifetime the variance shrinks by ~2/3).
  * KV: ``(N + 3 sqrt(N)) x context <= kv_capacity_tokens`` and ``<= max_num_seqs``
    (else queueing/preemption on the decode: "decode KV capacity"); KV link: bytes/s of
    prompts into one decode server < its bandwidth ("KV transfer bandwidth").

Colocated, ``n`` servers each doing both
  * prefill takes ``rho = arrivals x E[uncached] / R`` of every second; decode steps fill
    the rest, so a step lasts ``d / (1 - rho)`` on average with ``d = b + k N`` and
    ``N = A' b / (1 - A' k)``, ``A' = A / (1 - rho)``.
  * TPOT_i = d_i + (prefill seconds of the prompts that arrive on its server during its
    lifetime) / output_i — the prefill stalls disaggregation removes;
  * TTFT_i = M/G/c wait on prefill work ``S_j = u_j / R + ceil(u_j / B) d`` + its own S_i
    + half a decode step (the step in progress when it arrives).

Percentiles come from a seeded Monte Carlo over the workload's samples (``samples``
draws), so they reflect the length distribution, not just its mean. pdlb's own overhead
(~1 ms) and the client's are not modelled.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from lb.planner.profile import Profile
from lb.planner.workload import Workload, resample

PREFILL_COMPUTE = "prefill compute"
DECODE_ITL = "decode ITL"
DECODE_KV = "decode KV capacity"
KV_TRANSFER = "KV transfer bandwidth"
COLOCATED = "colocated compute"


@dataclass(frozen=True)
class SLOTarget:
    ttft_ms: float
    tpot_ms: float
    percentile: float = 90.0

    def __str__(self) -> str:
        return f"p{self.percentile:g} TTFT <= {self.ttft_ms:g} ms, TPOT <= {self.tpot_ms:g} ms"


@dataclass
class Prediction:
    """What the model says for one fleet at one rate (times in ms; inf = unstable)."""

    ttft_ms: float
    tpot_ms: float
    utilisation: dict[str, float] = field(default_factory=dict)
    """prefill / decode / kv / kv_link (disaggregated) or prefill / decode (colocated)."""
    failed: list[str] = field(default_factory=list)
    """The constraints this fleet breaks at this rate (empty: it meets the SLO)."""
    running: float = 0.0
    """Mean running sequences per decode (or colocated) server."""

    @property
    def ok(self) -> bool:
        return not self.failed


def pct(values: Sequence[float], p: float) -> float:
    vals = sorted(values)
    if not vals:
        return math.nan
    k = (len(vals) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(vals) - 1)
    a, b = vals[lo], vals[hi]
    if math.isinf(a) or math.isinf(b):
        return b if k > lo else a
    return a + (b - a) * (k - lo)


def erlang_c(c: int, a: float) -> float:
    """P(wait) in M/M/c with offered load ``a`` (< c) Erlangs."""
    if a <= 0:
        return 0.0
    if a >= c:
        return 1.0
    term, total = 1.0, 1.0  # sum_{k<c} a^k/k!, computed incrementally
    for k in range(1, c):
        term *= a / k
        total += term
    last = term * a / c  # a^c / c!
    top = last * c / (c - a)
    return top / (total + top)


class _Waits:
    """Waiting-time sampler of an M/G/c queue (Erlang C + Allen-Cunneen)."""

    def __init__(self, rate: float, servers: int, works: Sequence[float]) -> None:
        mean = math.fsum(works) / len(works)
        var = math.fsum((w - mean) ** 2 for w in works) / len(works)
        scv = var / mean**2 if mean > 0 else 0.0
        self.rho = rate * mean / servers if servers else math.inf
        self.stable = self.rho < 1.0
        self.p_wait = erlang_c(servers, rate * mean) if self.stable else 1.0
        self.theta = ((servers / mean - rate) * 2.0 / (1.0 + scv)) if self.stable else 0.0

    def sample(self, rng: random.Random) -> float:
        if not self.stable:
            return math.inf
        return rng.expovariate(self.theta) if rng.random() < self.p_wait else 0.0


@dataclass
class Model:
    """Predictions for one workload, profile and SLO (samples drawn once, reused)."""

    profile: Profile
    workload: Workload
    slo: SLOTarget
    samples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        self._draws = resample(self.workload, self.samples, self.seed)
        w = self.workload
        self.context = w.decode_context
        self.mean_out = w.mean_output
        self.mean_prompt = w.mean_prompt

    # -- decode server ---------------------------------------------------------------------
    def _decode_running(self, per_server_rate: float, stretch: float = 1.0) -> float:
        """Mean running sequences on one decode server (inf when unstable)."""
        d = self.profile.decode
        a = per_server_rate * self.mean_out * stretch
        b = d.base_ms / 1e3
        k = d.per_seq_ms / 1e3 + d.per_kv_token_us * self.context / 1e6
        if a * k >= 1.0:
            return math.inf
        return a * b / (1.0 - a * k)

    def decode_load(self, per_server_rate: float) -> float:
        """``A k`` of one decode server: the share of its step time that grows with the
        batch (1 = unstable)."""
        d = self.profile.decode
        k = d.per_seq_ms / 1e3 + d.per_kv_token_us * self.context / 1e6
        return per_server_rate * self.mean_out * k

    def _step_s(self, running: float) -> float:
        return self.profile.decode.itl_s(running, self.context)

    def _kv_failures(self, running: float) -> tuple[list[str], float]:
        d = self.profile.decode
        peak = running + 3.0 * math.sqrt(running)
        use = peak * self.context / d.kv_capacity_tokens
        fails = [DECODE_KV] if (use > 1.0 or peak > d.max_num_seqs) else []
        return fails, running * self.context / d.kv_capacity_tokens

    # -- disaggregated ------------------------------------------------------------------------
    def disaggregated(self, rate: float, n_prefill: int, n_decode: int) -> Prediction:
        pf, tr = self.profile.prefill, self.profile.transfer
        rng = random.Random(self.seed + 1)
        sat = pf.saturated_tokens_per_s
        works = [(p - c) / sat for p, c, _ in self._draws]
        waits = _Waits(rate, n_prefill, works)
        per_decode = rate / n_decode
        running = self._decode_running(per_decode)
        failed: list[str] = []
        util = {"prefill": waits.rho}
        if not waits.stable:
            failed.append(PREFILL_COMPUTE)
        if math.isinf(running):
            failed.append(DECODE_ITL)
            util["decode"] = math.inf
            return Prediction(math.inf, math.inf, util, failed, running)
        kv_fail, kv_use = self._kv_failures(running)
        failed += kv_fail
        util["kv"] = kv_use
        link = per_decode * self.mean_prompt * tr.bytes_per_token / tr.bytes_per_s()
        util["kv_link"] = link
        if link >= 1.0:
            failed.append(KV_TRANSFER)
        step = self._step_s(running)
        util["decode"] = 1.0 - self.profile.decode.base_ms / 1e3 / step if step > 0 else 0.0
        ttfts, tpots = [], []
        spread = math.sqrt(2.0 / 3.0 * running)
        for p, c, _o in self._draws:
            xfer = tr.time_s(p) / (1.0 - link) if link < 1.0 else math.inf
            ttfts.append(waits.sample(rng) + pf.alone_s(p - c) + xfer + 2.0 * step)
            n = max(1.0, 1.0 + running + rng.gauss(0.0, 1.0) * spread)
            tpots.append(self._step_s(n))
        return self._finish(ttfts, tpots, util, failed, running, PREFILL_COMPUTE, DECODE_ITL)

    # -- colocated ----------------------------------------------------------------------------
    def colocated(self, rate: float, servers: int) -> Prediction:
        pf = self.profile.prefill
        rng = random.Random(self.seed + 2)
        per_server = rate / servers
        rho = per_server * self.workload.mean_uncached / pf.tokens_per_s
        util = {"prefill": rho}
        if rho >= 1.0:
            return Prediction(math.inf, math.inf, util, [COLOCATED], math.inf)
        running = self._decode_running(per_server, 1.0 / (1.0 - rho))
        if math.isinf(running):
            util["decode"] = math.inf
            return Prediction(math.inf, math.inf, util, [COLOCATED], running)
        failed, kv_use = self._kv_failures(running)
        util["kv"] = kv_use
        d = self._step_s(running)
        util["decode"] = (1.0 - rho) * (1.0 - self.profile.decode.base_ms / 1e3 / d)
        bsz = pf.max_batched_tokens

        def service(u: float) -> float:
            return u / pf.tokens_per_s + max(1, math.ceil(u / bsz)) * d

        works = [service(p - c) for p, c, _ in self._draws]
        waits = _Waits(rate, servers, works)
        util["prefill_queue"] = waits.rho
        if not waits.stable:
            failed.append(COLOCATED)
        ttfts, tpots = [], []
        spread = math.sqrt(2.0 / 3.0 * running)
        mean_itl = d / (1.0 - rho)
        n_draws = len(self._draws)
        s1 = math.fsum((p - c) / pf.tokens_per_s for p, c, _ in self._draws) / n_draws
        s2 = math.fsum(((p - c) / pf.tokens_per_s) ** 2 for p, c, _ in self._draws) / n_draws
        for (_p, _c, o), work in zip(self._draws, works, strict=True):
            ttfts.append(waits.sample(rng) + work + 0.5 * d)
            n = max(1.0, 1.0 + running + rng.gauss(0.0, 1.0) * spread)
            life = o * mean_itl
            expect = per_server * life
            if expect > 20:  # compound Poisson sum, normal approximation
                stall_s = max(0.0, rng.gauss(expect * s1, math.sqrt(expect * s2)))
            else:
                stall_s = 0.0
                for _ in range(_poisson(rng, expect)):
                    q, qc, _qo = self._draws[rng.randrange(n_draws)]
                    stall_s += (q - qc) / pf.tokens_per_s
            tpots.append(self._step_s(n) + stall_s / max(1, o - 1))
        return self._finish(ttfts, tpots, util, failed, running, COLOCATED, COLOCATED)

    def _finish(self, ttfts: list[float], tpots: list[float], util: dict[str, float],
                failed: list[str], running: float, ttft_reason: str, tpot_reason: str
                ) -> Prediction:
        ttft = pct(ttfts, self.slo.percentile) * 1e3
        tpot = pct(tpots, self.slo.percentile) * 1e3
        if ttft > self.slo.ttft_ms and ttft_reason not in failed:
            failed.append(ttft_reason)
        if tpot > self.slo.tpot_ms and tpot_reason not in failed:
            failed.append(tpot_reason)
        return Prediction(ttft, tpot, util, failed, running)


def _poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw (Knuth for small means, a rounded normal for large ones)."""
    if mean <= 0:
        return 0
    if mean > 50:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, prod = math.exp(-mean), 0, rng.random()
    while prod > limit:
        k += 1
        prod *= rng.random()
    return k
