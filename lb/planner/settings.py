"""``[planner]``: the live replica recommendation (lb/planner/online.py, docs/planner.md).

    [planner]
    enabled = true
    profile = "profile.json"       # pdlb plan profile --out
    slo = "ttft:1000,tpot:50"
    percentile = 90
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.options import Options


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    enabled: bool = False
    profile: str | None = None
    """The capacity profile (``pdlb plan profile --out``); read at start-up."""
    ttft_ms: float = 1000.0
    tpot_ms: float = 50.0
    percentile: float = 90.0
    window_s: float = 60.0
    """Arrival rates and the length mix are measured over this window."""
    interval_s: float = 5.0
    """The recommendation is recomputed at most this often (when /metrics is read)."""
    model_load_s: float = 120.0
    """A new replica's start-up (pull, load weights, warm up CUDA graphs): no lower
    recommendation is acted on until the last change has had this long plus warmup_s."""
    warmup_s: float = 60.0
    """Prefix-cache warm-up of a new replica."""
    scale_down_after_s: float = 300.0
    """A lower recommendation takes effect only after it held this long (the highest one
    in that window wins, as Kubernetes' own stabilisation window)."""
    min_replicas: int = 1
    max_replicas: int = 64
    samples: int = 400
    """Most recent requests the length mix is drawn from."""


def read_planner(r: Options) -> PlannerConfig:
    from loadgen.metrics import SLO

    slo_text = r.value("slo", str, "ttft:1000,tpot:50")
    try:
        slo = SLO.parse(slo_text)
    except ValueError as exc:
        raise r.fail("slo", str(exc)) from None
    if slo.ttft_ms is None or slo.tpot_ms is None:
        raise r.fail("slo", "expected both ttft:MS and tpot:MS")
    config = PlannerConfig(
        enabled=r.value("enabled", bool, False),
        profile=r.value("profile", str, None),
        ttft_ms=slo.ttft_ms,
        tpot_ms=slo.tpot_ms,
        percentile=r.number("percentile", 90.0, minimum=1.0, maximum=99.9),
        window_s=r.number("window_s", 60.0, minimum=1.0),
        interval_s=r.number("interval_s", 5.0, minimum=0.1),
        model_load_s=r.number("model_load_s", 120.0, minimum=0.0),
        warmup_s=r.number("warmup_s", 60.0, minimum=0.0),
        scale_down_after_s=r.number("scale_down_after_s", 300.0, minimum=0.0),
        min_replicas=r.integer("min_replicas", 1, minimum=1),
        max_replicas=r.integer("max_replicas", 64, minimum=1),
        samples=r.integer("samples", 400, minimum=20),
    )
    if config.enabled and not config.profile:
        raise r.fail("profile", "the planner needs a capacity profile (pdlb plan profile --out"
                     " FILE)", show_value=False)
    if config.max_replicas < config.min_replicas:
        raise r.fail("max_replicas", f"must be >= min_replicas ({config.min_replicas})")
    r.done()
    return config
