"""pdlb's load generator: open/closed-loop load against OpenAI-compatible endpoints,
with vLLM ``bench serve`` metric definitions, goodput and SLO attainment.

Python API::

    from loadgen import LoadConfig, SLO, run
    result = await run(LoadConfig(url=..., rate=10, duration_s=30, slo=SLO.parse("ttft:500")))

CLI: ``pdlb loadgen ...`` or ``python -m loadgen ...`` (see :mod:`loadgen.cli`).
"""

from loadgen.api import RunResult, render_side_by_side, run
from loadgen.client import LoadgenError
from loadgen.config import LoadConfig
from loadgen.metrics import SLO, summarize
from loadgen.records import Record
from loadgen.workload import MIXES, LengthDist

__all__ = [
    "MIXES",
    "SLO",
    "LengthDist",
    "LoadConfig",
    "LoadgenError",
    "Record",
    "RunResult",
    "render_side_by_side",
    "run",
    "summarize",
]
