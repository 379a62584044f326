"""Scrape each backend's vLLM ``/metrics`` on an interval, so policies see vLLM's own load.

Cheap by construction: one GET per backend per interval (default 1 s), a line scan for the
three series policies use (no full Prometheus parser), and values summed over engine labels
(a data-parallel server reports one series per engine). A backend that does not answer
keeps its last sample, aging (``ScrapedLoad.age_s``); policies decide how much to trust it.
After every scrape the backend's ``tokens_since_scrape`` resets, so ``least_tokens``-style
policies can add what pdlb dispatched since the sample was taken.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from lb.errors import PdlbError
from lb.poller import BackendPoller
from lb.pool import Backend
from lb.upstream import Upstream
from policies.base import ScrapedLoad

log = logging.getLogger("pdlb.scrape")

SERIES = {
    b"vllm:num_requests_running": "running",
    b"vllm:num_requests_waiting": "waiting",
    b"vllm:kv_cache_usage_perc": "kv_usage",
    b"vllm:gpu_cache_usage_perc": "kv_usage_old",  # deprecated name, older vLLM
}


def parse_vllm_load(text: str) -> ScrapedLoad:
    """Sum the load series over all label sets; ignore everything else."""
    totals = {"running": 0.0, "waiting": 0.0, "kv_usage": 0.0, "kv_usage_old": 0.0}
    engines = {"kv_usage": 0, "kv_usage_old": 0}
    for line in text.encode().splitlines():
        if not line.startswith(b"vllm:"):
            continue
        name_end = min((i for i in (line.find(b"{"), line.find(b" ")) if i >= 0), default=-1)
        if name_end < 0:
            continue
        key = SERIES.get(line[:name_end])
        if key is None:
            continue
        try:
            value = float(line.rsplit(b" ", 1)[-1])
        except ValueError:
            continue
        totals[key] += value
        if key in engines:
            engines[key] += 1
    kv_key = "kv_usage" if engines["kv_usage"] else "kv_usage_old"
    kv = totals[kv_key] / engines[kv_key] if engines[kv_key] else 0.0
    return ScrapedLoad(running=totals["running"], waiting=totals["waiting"], kv_usage=kv)


class LoadScraper(BackendPoller):
    name = "pdlb-scrape"

    def __init__(self, backends: Iterable[Backend], upstream: Upstream, interval_s: float,
                 timeout_s: float) -> None:
        super().__init__(backends, interval_s)
        self.upstream = upstream
        self.timeout_s = timeout_s
        self._taken: dict[int, float] = {}

    async def visit(self, backend: Backend) -> bool:
        try:
            status, text = await self.upstream.get_text(
                backend.url + "/metrics", timeout_s=self.timeout_s
            )
        except PdlbError:
            status, text = 0, ""
        now = time.monotonic()
        if status != 200:
            if backend.load is not None:  # keep the last sample, but let it age
                taken = self._taken.get(id(backend), now)
                backend.load = _aged(backend.load, now - taken)
            return False
        backend.load = parse_vllm_load(text)
        backend.tokens_since_scrape = 0
        self._taken[id(backend)] = now
        return True


def _aged(load: ScrapedLoad, age_s: float) -> ScrapedLoad:
    return ScrapedLoad(running=load.running, waiting=load.waiting, kv_usage=load.kv_usage,
                       age_s=age_s)
