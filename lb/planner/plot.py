"""The plan as a picture: servers needed vs rate, PD (stacked prefill + decode) and
colocated. matplotlib comes with ``pdlb[plots]``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from lb.planner.search import Plan


def plot(plans: Sequence[Plan], path: str | Path, title: str) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("the plot needs matplotlib: pip install 'pdlb[plots]'") from exc
    rates = [p.rate for p in plans]
    pre = [p.prefill or 0 for p in plans]
    dec = [p.decode or 0 for p in plans]
    co = [p.colocated if p.colocated is not None else float("nan") for p in plans]
    width = (min(b - a for a, b in itertools.pairwise(rates)) * 0.35
             if len(rates) > 1 else max(rates[0] * 0.2, 0.1))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [r - width / 2 for r in rates]
    ax.bar(xs, pre, width, label="prefill servers", color="#4c72b0")
    ax.bar(xs, dec, width, bottom=pre, label="decode servers", color="#dd8452")
    ax.bar([r + width / 2 for r in rates], co, width, label="colocated servers",
           color="#55a868")
    for x, p in zip(xs, plans, strict=True):
        if p.binding:
            ax.annotate(p.binding, (x, (p.prefill or 0) + (p.decode or 0)),
                        textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7,
                        rotation=90)
    ax.set_xlabel("arrival rate (requests/s)")
    ax.set_ylabel("servers")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
