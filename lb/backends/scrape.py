"""Scrape each backend's vLLM ``/metrics`` on an interval, so policies see vLLM's own load.

Cheap by construction: one GET per backend per interval (default 1 s), a line scan for the
series policies use (no full Prometheus parser): running and waiting requests summed over
engine labels (a data-parallel server reports one series per engine), KV cache usage
averaged over them, KV capacity in tokens summed from ``vllm:cache_config_info``. A backend
that does not answer keeps its last sample, aging (``ScrapedLoad.age_s``); policies decide
how much to trust it. After every scrape the backend's ``tokens_since_scrape`` resets, so
``least_tokens``-style policies can add what pdlb dispatched since the sample was taken.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Iterable

from lb.backends.poller import BackendPoller
from lb.backends.pool import Backend
from lb.backends.upstream import Upstream
from lb.errors import PdlbError
from policies.base import ScrapedLoad

log = logging.getLogger("pdlb.scrape")

SERIES = {
    b"vllm:num_requests_running": "running",
    b"vllm:num_requests_waiting": "waiting",
    b"vllm:kv_cache_usage_perc": "kv_usage",
    b"vllm:gpu_cache_usage_perc": "kv_usage_old",  # deprecated name, older vLLM
}


_CAPACITY_TOKENS = re.compile(rb'kv_cache_size_tokens="(\d+)"')
_GPU_BLOCKS = re.compile(rb'num_gpu_blocks="(\d+)"')
_BLOCK_SIZE = re.compile(rb'block_size="(\d+)"')


def _capacity(line: bytes) -> int | None:
    """KV capacity in tokens from a vllm:cache_config_info line's labels."""
    match = _CAPACITY_TOKENS.search(line)
    if match:
        return int(match.group(1))
    blocks, size = _GPU_BLOCKS.search(line), _BLOCK_SIZE.search(line)
    if blocks and size:
        return int(blocks.group(1)) * int(size.group(1))
    return None


def parse_vllm_load(text: str) -> ScrapedLoad:
    """Sum the load series over all label sets; ignore everything else."""
    totals = {"running": 0.0, "waiting": 0.0, "kv_usage": 0.0, "kv_usage_old": 0.0}
    engines = {"kv_usage": 0, "kv_usage_old": 0}
    capacity: int | None = None
    for line in text.encode().splitlines():
        if not line.startswith(b"vllm:"):
            continue
        if line.startswith(b"vllm:cache_config_info"):
            engine_capacity = _capacity(line)
            if engine_capacity is not None:
                capacity = (capacity or 0) + engine_capacity
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
    return ScrapedLoad(running=totals["running"], waiting=totals["waiting"], kv_usage=kv,
                       kv_capacity_tokens=capacity)


class LoadScraper(BackendPoller):
    name = "pdlb-scrape"

    def __init__(self, backends: Iterable[Backend], upstream: Upstream, interval_s: float,
                 timeout_s: float, on_round: Callable[[], None] | None = None) -> None:
        super().__init__(backends, interval_s)
        self.upstream = upstream
        self.timeout_s = timeout_s
        self.on_round = on_round
        self._taken: dict[int, float] = {}

    def after_round(self) -> None:
        if self.on_round is not None:
            self.on_round()

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
    return dataclasses.replace(load, age_s=age_s)
