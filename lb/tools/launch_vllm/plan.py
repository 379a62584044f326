"""What ``pdlb launch-vllm`` starts: the launch configuration and, from it, every server's
command line, environment additions, ports and log file (:func:`plan_servers`, pure apart
from picking free ports), and the ``backends.toml`` pdlb needs in front of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Role = Literal["prefill", "decode"]
Device = Literal["cpu", "gpu"]
Connector = Literal["nixl", "shared_storage"]

DEFAULT_BASE_PORT = 8100
DEFAULT_SIDE_CHANNEL_PORT = 5600
# Room between two servers' NIXL side-channel ports: vLLM adds the data-parallel index.
SIDE_CHANNEL_STRIDE = 10
DECODE_PORT_OFFSET = 100
# KV-cache events (--kv-events): server k publishes on KV_EVENTS_PORT + 10*k (vLLM adds the
# data-parallel rank), below the side channels' 5600.. .
DEFAULT_KV_EVENTS_PORT = 5200
KV_EVENTS_STRIDE = 10
KV_EVENTS_TOPIC = "kv"

# pdlb's source checkout: this file is lb/tools/launch_vllm/plan.py in it.
_REPO_ROOT = Path(__file__).resolve().parents[3]


class VllmLaunchError(RuntimeError):
    """A vLLM server could not be planned, started or kept alive."""


@dataclass(frozen=True)
class LaunchConfig:
    """What to launch; every field has the CLI flag of the same name."""

    model: str
    prefill: int = 1
    decode: int = 1
    vllm: tuple[str, ...] | None = None
    host: str = "127.0.0.1"
    # 0: pick free ports (tests); else prefill i on base+i, decode j on base+100+j.
    base_port: int = DEFAULT_BASE_PORT
    # 0: pick free ports; else server k on side_channel_port + 10*k.
    side_channel_port: int = DEFAULT_SIDE_CHANNEL_PORT
    side_channel_host: str | None = None
    # KV-cache events: --enable-prefix-caching and a ZMQ publisher per server (pdlb's
    # [kv_events] finds it through the server's GET /kv_event_sources).
    kv_events: bool = False
    # 0: pick free ports (below the ephemeral range: the engine binds late); else server k
    # publishes on kv_events_port + 10*k.
    kv_events_port: int = DEFAULT_KV_EVENTS_PORT
    device: Device = "cpu"
    served_model_name: str | None = None
    connector: Connector = "nixl"
    shared_storage_path: str | None = None
    max_model_len: int | None = None
    enforce_eager: bool | None = None
    extra_vllm_args: tuple[str, ...] = ()
    cpu_kvcache_space_gib: int = 1
    # PDLB_NIXL_PTHR_DELAY_US for NIXL's UCX progress thread (honoured by the patched NIXL of
    # scripts/vllm-cpu-env; NIXL itself spins with 0). None: 1000 on cpu, unset on gpu.
    nixl_progress_delay_us: int | None = None
    gpus_per_server: int = 1
    gpus: tuple[int, ...] | None = None
    run_dir: Path | None = None
    startup_timeout_s: float = 600.0
    stop_timeout_s: float = 30.0


@dataclass(frozen=True)
class ServerPlan:
    """One vLLM server: its role, address, command line and environment additions."""

    role: Role
    index: int
    host: str
    port: int
    side_channel_port: int | None
    argv: tuple[str, ...]
    env: Mapping[str, str]
    log_path: Path
    kv_events_port: int | None = None
    """Where the server's engine publishes its KV-cache events (ZMQ PUB), when on."""

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def find_vllm(explicit: str | None = None) -> tuple[str, ...]:
    """The command that runs vLLM's CLI.

    ``explicit`` may be a ``vllm`` executable or a Python interpreter (then ``python -m
    vllm.entrypoints.cli.main``). Without it: ``vllm`` on PATH, else ``.venv-vllm/bin/vllm`` in
    the current directory or in pdlb's source checkout.
    """
    if explicit:
        path = Path(explicit).expanduser()
        resolved = shutil.which(str(path))
        if resolved is None:
            raise VllmLaunchError(f"--vllm {explicit}: not an executable file")
        if path.name.startswith("python"):
            return (resolved, "-m", "vllm.entrypoints.cli.main")
        return (resolved,)
    on_path = shutil.which("vllm")
    if on_path:
        return (on_path,)
    for root in (Path.cwd(), _REPO_ROOT):
        candidate = root / ".venv-vllm" / "bin" / "vllm"
        if os.access(candidate, os.X_OK):
            return (str(candidate),)
    raise VllmLaunchError(
        "no vLLM found: pass --vllm PATH (a vllm executable or its venv's python), put vllm "
        "on PATH, or build the CPU environment with scripts/vllm-cpu-env"
    )


def _free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct free ports, all held open together so none repeats."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_listen_ports(count: int, lowest: int = 20000) -> list[int]:
    """``count`` distinct ports free on every IPv4 interface, drawn at random *below* the
    kernel's ephemeral range.

    For listeners bound late: vLLM's engine binds its KV-events socket ~30 s after the plan
    is made, and a port from ``bind(0)`` (the ephemeral range) was seen taken by then —
    outgoing connections and every ``bind(0)`` on the machine draw from that range. Outside
    it only another explicit listener can collide. Falls back to :func:`_free_ports` when
    the range leaves no room below it.
    """
    top = _ephemeral_low()
    if top - lowest < 100 * count:
        return _free_ports("0.0.0.0", count)
    candidates = random.sample(range(lowest, top), k=min(top - lowest, 50 * count + 200))
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for port in candidates:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            ports.append(port)
            if len(ports) == count:
                return ports
    return _free_ports("0.0.0.0", count)


def split_cpus(cpus: Sequence[int], n: int) -> list[str]:
    """Share ``cpus`` among ``n`` servers as VLLM_CPU_OMP_THREADS_BIND lists ("0,1" ...).

    With at least one core per server each gets a disjoint contiguous slice (leftover cores
    go to the first servers); with fewer cores than servers they are shared round-robin.
    """
    if n < 1 or not cpus:
        raise VllmLaunchError(f"cannot share {len(cpus)} CPUs among {n} servers")
    ordered = sorted(cpus)
    if len(ordered) < n:
        return [str(ordered[i % len(ordered)]) for i in range(n)]
    per, extra = divmod(len(ordered), n)
    out, start = [], 0
    for i in range(n):
        size = per + (1 if i < extra else 0)
        out.append(",".join(str(c) for c in ordered[start : start + size]))
        start += size
    return out


def _served_name(config: LaunchConfig) -> str:
    if config.served_model_name:
        return config.served_model_name
    return Path(config.model).name if Path(config.model).is_dir() else config.model


def _kv_transfer_config(config: LaunchConfig, role: Role) -> dict[str, object]:
    if config.connector == "nixl":
        return {
            "kv_connector": "NixlConnector",
            "kv_role": "kv_producer" if role == "prefill" else "kv_consumer",
            "kv_buffer_device": "cpu" if config.device == "cpu" else "cuda",
        }
    if not config.shared_storage_path:
        raise VllmLaunchError("--connector shared_storage needs --shared-storage-path")
    return {
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_producer" if role == "prefill" else "kv_consumer",
        "kv_connector_extra_config": {"shared_storage_path": config.shared_storage_path},
    }


def kv_events_config(port: int) -> dict[str, object]:
    """vLLM's ``--kv-events-config`` (``KVEventsConfig``) publishing on ``port``.

    The endpoint must be a wildcard: vLLM 0.32's publisher binds only ``*``, ``::``, ipc and
    inproc endpoints and *connects* to any other address, so ``tcp://127.0.0.1:PORT`` would
    publish to nobody. The socket therefore listens on every IPv4 interface."""
    return {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{port}",
        "topic": KV_EVENTS_TOPIC,
    }


def plan_servers(
    config: LaunchConfig,
    *,
    vllm: Sequence[str],
    run_dir: Path,
    cpus: Sequence[int] | None = None,
) -> list[ServerPlan]:
    """The servers ``config`` describes: argv, environment additions, ports, log file.

    Pure apart from picking free ports when ``base_port`` / ``side_channel_port`` is 0.
    """
    if config.prefill < 1 or config.decode < 1:
        raise VllmLaunchError("need at least one prefill and one decode server")
    if config.gpus_per_server < 1:
        raise VllmLaunchError("--gpus-per-server must be at least 1")
    roles: list[tuple[Role, int]] = [("prefill", i) for i in range(config.prefill)]
    roles += [("decode", i) for i in range(config.decode)]
    n = len(roles)

    if config.base_port == 0:
        http_ports = _free_ports(config.host, n)
    else:
        http_ports = [
            config.base_port + (DECODE_PORT_OFFSET if role == "decode" else 0) + i
            for role, i in roles
        ]
    if config.side_channel_port == 0:
        side_ports = _free_ports(config.host, n)
    else:
        side_ports = [config.side_channel_port + SIDE_CHANNEL_STRIDE * k for k in range(n)]
    event_ports: list[int | None] = [None] * n
    if config.kv_events:
        if config.kv_events_port == 0:
            event_ports = list(_free_listen_ports(n))
        else:
            event_ports = [config.kv_events_port + KV_EVENTS_STRIDE * k for k in range(n)]

    if config.device == "cpu":
        binds = split_cpus(cpus if cpus is not None else sorted(os.sched_getaffinity(0)), n)
    else:
        needed = n * config.gpus_per_server
        gpus = list(config.gpus) if config.gpus is not None else list(range(needed))
        if len(gpus) < needed:
            raise VllmLaunchError(
                f"{n} servers x {config.gpus_per_server} GPU(s) need {needed} GPUs; "
                f"--gpus lists {len(gpus)}"
            )

    side_host = config.side_channel_host or config.host
    eager = config.enforce_eager if config.enforce_eager is not None else config.device == "cpu"
    model = str(Path(config.model).resolve()) if Path(config.model).is_dir() else config.model
    plans = []
    for k, ((role, index), port) in enumerate(zip(roles, http_ports, strict=True)):
        argv = [
            *vllm,
            "serve",
            model,
            "--host",
            config.host,
            "--port",
            str(port),
            "--served-model-name",
            _served_name(config),
            "--enable-prompt-tokens-details",
            "--kv-transfer-config",
            json.dumps(_kv_transfer_config(config, role), separators=(",", ":")),
        ]
        event_port = event_ports[k]
        if event_port is not None:
            argv += [
                "--enable-prefix-caching",
                "--kv-events-config",
                json.dumps(kv_events_config(event_port), separators=(",", ":")),
            ]
        if config.max_model_len is not None:
            argv += ["--max-model-len", str(config.max_model_len)]
        if eager:
            argv.append("--enforce-eager")
        env = {"TMPDIR": str(run_dir / "tmp" / f"{role}-{index}")}
        side_port: int | None = None
        if config.connector == "nixl":
            side_port = side_ports[k]
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = side_host
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_port)
            delay = config.nixl_progress_delay_us
            if delay is None and config.device == "cpu":
                delay = 1000
            if delay is not None:
                env["PDLB_NIXL_PTHR_DELAY_US"] = str(delay)
        if config.device == "cpu":
            argv += ["--dtype", "bfloat16"]
            env["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kvcache_space_gib)
            env["VLLM_CPU_OMP_THREADS_BIND"] = binds[k]
        else:
            mine = gpus[k * config.gpus_per_server : (k + 1) * config.gpus_per_server]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in mine)
            if config.gpus_per_server > 1:
                argv += ["--tensor-parallel-size", str(config.gpus_per_server)]
        argv += config.extra_vllm_args
        plans.append(
            ServerPlan(
                role=role,
                index=index,
                host=config.host,
                port=port,
                side_channel_port=side_port,
                argv=tuple(argv),
                env=env,
                log_path=run_dir / "logs" / f"{role}-{index}.log",
                kv_events_port=event_port,
            )
        )
    return plans


def backends_toml(
    prefill_urls: Sequence[str],
    decode_urls: Sequence[str],
    *,
    connector: Connector = "nixl",
    lb_host: str = "127.0.0.1",
    lb_port: int = 8000,
    kv_events: bool = False,
    model_dir: str | Path | None = None,
) -> str:
    """A pdlb backends.toml for these pools (JSON strings are valid TOML basic strings).

    ``kv_events``: servers launched with ``--kv-events``; pdlb subscribes to their events
    (``[kv_events]``, endpoints from each server's ``GET /kv_event_sources``) and routes the
    prefill pool with ``kv_aware``. The events need the prompt's exact token ids: with
    ``model_dir`` (a local model) pdlb's ``[tokenizer]`` is that model's tokenizer and chat
    template (``kind = "hf"``); without one (a hub id) it asks a prefill server's
    ``POST /tokenize`` (``token_ids = "backend"``, one round trip per request).
    """

    def backends(urls: Sequence[str]) -> str:
        items = ",\n".join(f"    {{ url = {json.dumps(u)} }}" for u in urls)
        return f"[\n{items},\n]"

    text = (
        "# Written by `pdlb launch-vllm`.\n"
        "[server]\n"
        f"host = {json.dumps(lb_host)}\n"
        f"port = {lb_port}\n\n"
        "[pools.prefill]\n"
        f"policy = {json.dumps('kv_aware' if kv_events else 'round_robin')}\n"
        f"backends = {backends(prefill_urls)}\n\n"
        "[pools.decode]\n"
        'policy = "least_tokens"\n'
        f"backends = {backends(decode_urls)}\n\n"
        "[kv_transfer]\n"
        f"connector = {json.dumps(connector)}\n"
    )
    if kv_events:
        text += "\n[kv_events]\nenabled = true\n\n[tokenizer]\n"
        if model_dir is not None:
            text += f'kind = "hf"\npath = {json.dumps(str(Path(model_dir).resolve()))}\n'
        else:
            text += 'token_ids = "backend"  # exact ids from a prefill\'s POST /tokenize\n'
    return text
