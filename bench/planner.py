"""``pdlb plan`` checked on emulator fleets: does the recommended fleet meet the SLO, and
does one server fewer in its binding pool miss it?

    flock /tmp/pdlb-heavy.lock .venv/bin/python bench/planner.py [--rate 6] [--time-scale 2]

1. ``pdlb plan profile --emulate`` measures an emulated prefill + decode pair of a small,
   slow "GPU" (the knobs below: ~4,000 prefill tokens/s, 20 ms decode steps, 40k KV tokens)
   so that a few servers saturate at rates this 2-core box can drive.
2. ``pdlb plan`` on that measured profile, for an input-heavy and an output-heavy workload,
   simulating the recommended fleet, one server fewer in the binding pool, and the colocated
   fleet (``--check-fewer --check-colocated``).

Prints the tables and check lines; docs/planner.md quotes one run. About 5-8 minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lb.planner.cli import main as plan_main

SLOW = ["step_base_ms=20", "decode_per_seq_ms=0.5", "decode_per_kv_token_us=0.5",
        "prefill_tokens_per_s=4000", "kv_capacity_tokens=40000", "max_num_batched_tokens=2048"]
WORKLOADS = {
    "input-heavy (prompt 1024±256, output 32±8)": ["--input-len", "1024:256",
                                                   "--output-len", "32:8"],
    "output-heavy (prompt 64±16, output 256±64)": ["--input-len", "64:16",
                                                   "--output-len", "256:64"],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="6", help="requests/s (comma-separated for several)")
    p.add_argument("--slo", default="ttft:1500,tpot:60")
    p.add_argument("--duration", default="60", help="model seconds per simulation")
    p.add_argument("--time-scale", default="2", help="emulator time scale in simulations")
    p.add_argument("--out", help="folder for profile.json and the plans' JSON")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="pdlb-bench-planner-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"# pdlb plan on emulator fleets — {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}"
          f" UTC, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}\n", flush=True)
    started = time.monotonic()
    print("## profile (measured)\n", flush=True)
    rc = plan_main(["profile", "--emulate", *SLOW, "--quick", "--out",
                    str(out / "profile.json")])
    if rc:
        return rc
    for name, flags in WORKLOADS.items():
        print(f"\n## {name}\n", flush=True)
        rc = plan_main(["--profile", str(out / "profile.json"), *flags, "--slo", args.slo,
                        "--rates", args.rate, "--check-fewer", "--check-colocated",
                        "--sim-duration", args.duration, "--sim-time-scale", args.time_scale,
                        "--json", str(out / f"{name.split()[0]}.json"),
                        "--plot", str(out / f"{name.split()[0]}.png")])
        if rc:
            return rc
    print(f"\n{time.monotonic() - started:.0f} s; files in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
