"""LoadConfig: everything one run needs, as the CLI flags set it (one frozen dataclass).

Validation happens here, once, before anything is sent; errors name the setting and value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from loadgen.metrics import SLO
from loadgen.schedule import ARRIVALS
from loadgen.tokenizer import DEFAULT_TOKENIZER
from loadgen.workload import MIXES, LengthDist

Endpoint = Literal["completions", "chat"]
ENDPOINT_PATHS: dict[str, str] = {"completions": "/v1/completions",
                                  "chat": "/v1/chat/completions"}

DEFAULT_INPUT = LengthDist(256)
DEFAULT_OUTPUT = LengthDist(64)


@dataclass(frozen=True)
class LoadConfig:
    """One load-generation run. Open loop with ``rate``, closed loop with ``concurrency``.

    With neither, a dataset with timestamps is replayed as a trace. ``duration_s`` and/or
    ``num_requests`` bound the run (a trace or a finite dataset bounds itself).
    """

    url: str
    model: str | None = None
    endpoint: Endpoint = "completions"
    # arrivals
    rate: float | None = None
    arrival: str = "poisson"
    burstiness: float = 1.0
    ramp_to: float | None = None
    concurrency: int | None = None
    max_concurrency: int | None = None
    think_time_s: float = 0.0
    duration_s: float | None = None
    num_requests: int | None = None
    time_scale: float = 1.0
    # workload
    mix: str | None = None
    input_len: LengthDist | None = None
    output_len: LengthDist | None = None
    dataset: str | None = None
    dataset_format: str = "auto"
    turns: int | None = None
    prefix_groups: int = 0
    prefix_len: int = 0
    questions_per_group: int = 1
    tokenizer: str = DEFAULT_TOKENIZER
    seed: int = 0
    # request shape
    ignore_eos: bool = True
    continuous_usage: bool = True
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    api_key: str | None = None
    timeout_s: float = 600.0
    http_client: str = "fast"
    # run control
    warmup: int = 0
    preflight: bool = True
    workers: int = 1
    slo: SLO | None = None
    slo_target: float = 0.9
    max_lag_ms: float = 5.0
    scrape_metrics: bool = False
    metrics_url: str | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, why: str) -> ValueError:
            return ValueError(f"loadgen config: {name}={value!r}: {why}")

        if not self.url.startswith(("http://", "https://")):
            raise bad("url", self.url, "must start with http:// or https://")
        if self.endpoint not in ENDPOINT_PATHS:
            raise bad("endpoint", self.endpoint, "choose completions or chat")
        if self.rate is not None and self.concurrency is not None:
            raise bad("rate", self.rate, "give --rate (open loop) or --concurrency "
                      "(closed loop), not both; use --max-concurrency to cap an open loop")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise bad("rate", self.rate, "must be a positive finite number of requests/s")
        if self.arrival not in ARRIVALS:
            raise bad("arrival", self.arrival, f"choose one of {', '.join(ARRIVALS)}")
        if not self.burstiness > 0:
            raise bad("burstiness", self.burstiness, "must be > 0")
        if self.ramp_to is not None and (self.rate is None or not self.ramp_to > 0):
            raise bad("ramp_to", self.ramp_to, "needs --rate and must be > 0")
        for name in ("concurrency", "max_concurrency", "num_requests"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise bad(name, v, "must be >= 1")
        if self.duration_s is not None and not self.duration_s > 0:
            raise bad("duration_s", self.duration_s, "must be > 0")
        if self.think_time_s < 0:
            raise bad("think_time_s", self.think_time_s, "must be >= 0")
        if not self.time_scale > 0:
            raise bad("time_scale", self.time_scale, "must be > 0")
        if self.mix is not None and self.mix not in MIXES:
            raise bad("mix", self.mix, f"choose one of {', '.join(MIXES)}")
        if self.dataset_format not in ("auto", "jsonl", "sharegpt"):
            raise bad("dataset_format", self.dataset_format, "choose auto, jsonl or sharegpt")
        if self.turns is not None and self.turns < 1:
            raise bad("turns", self.turns, "must be >= 1")
        if self.workers < 1:
            raise bad("workers", self.workers, "must be >= 1")
        if not 0 < self.slo_target <= 1:
            raise bad("slo_target", self.slo_target, "must be a fraction in (0, 1]")
        if self.http_client not in ("fast", "aiohttp"):
            raise bad("http_client", self.http_client, "choose fast or aiohttp")
        if not self.timeout_s > 0:
            raise bad("timeout_s", self.timeout_s, "must be > 0")
        if self.warmup < 0:
            raise bad("warmup", self.warmup, "must be >= 0")
        if (self.rate is None and self.concurrency is None and self.dataset is None):
            raise bad("rate", None, "give --rate R (open loop), --concurrency N (closed "
                      "loop), or a --dataset with timestamps to replay")
        if (self.rate is not None or self.concurrency is not None) and (
                self.duration_s is None and self.num_requests is None
                and self.dataset is None):
            raise bad("duration_s", None, "give --duration S or --num-requests N")

    # --- resolved views -----------------------------------------------------------------
    @property
    def api_url(self) -> str:
        return self.url.rstrip("/") + ENDPOINT_PATHS[self.resolved_endpoint]

    @property
    def resolved_endpoint(self) -> str:
        mix = MIXES.get(self.mix or "")
        if mix is not None and mix.endpoint and self.endpoint == "completions":
            return mix.endpoint
        return self.endpoint

    @property
    def resolved_input_len(self) -> LengthDist:
        mix = MIXES.get(self.mix or "")
        return self.input_len or (mix.input_len if mix else DEFAULT_INPUT)

    @property
    def resolved_output_len(self) -> LengthDist:
        mix = MIXES.get(self.mix or "")
        return self.output_len or (mix.output_len if mix else DEFAULT_OUTPUT)

    @property
    def resolved_turns(self) -> int:
        mix = MIXES.get(self.mix or "")
        return self.turns or (mix.turns if mix else 1)

    @property
    def mode(self) -> str:
        if self.concurrency is not None:
            return "closed"
        if self.rate is not None:
            return "open"
        return "trace"

    def replace(self, **changes: Any) -> LoadConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; secrets (api_key, Authorization) are redacted."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, LengthDist | SLO):
                v = v.to_dict()
            elif isinstance(v, Mapping):
                v = dict(v)
            out[f.name] = v
        if out.get("api_key"):
            out["api_key"] = "***"
        out["headers"] = {k: ("***" if k.lower() == "authorization" else v)
                          for k, v in out["headers"].items()}
        out["resolved"] = {"endpoint": self.resolved_endpoint, "mode": self.mode,
                           "input_len": self.resolved_input_len.to_dict(),
                           "output_len": self.resolved_output_len.to_dict(),
                           "turns": self.resolved_turns}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoadConfig:
        """Rebuild from :meth:`to_dict` output (the ``config`` of a result file)."""
        kwargs = {k: v for k, v in data.items()
                  if k in {f.name for f in dataclasses.fields(cls)}}
        for name in ("input_len", "output_len"):
            if isinstance(kwargs.get(name), Mapping):
                kwargs[name] = LengthDist(**kwargs[name])
        if isinstance(kwargs.get("slo"), Mapping):
            kwargs["slo"] = SLO(**kwargs["slo"])
        if kwargs.get("api_key") == "***":
            kwargs["api_key"] = None
        return cls(**kwargs)
