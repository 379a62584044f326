"""Start local vLLM prefill/decode pools for pdlb: ``pdlb launch-vllm``.

    pdlb launch-vllm --model DIR --prefill 1 --decode 1 --write-config backends.toml

starts ``--prefill`` prefill servers (kv_role ``kv_producer``) and ``--decode`` decode servers
(kv_role ``kv_consumer``) of one model, each with its own HTTP port, NIXL side-channel port and
device share, waits until every ``/health`` answers 200, writes a ``backends.toml`` for
``pdlb serve --config``, and keeps them running until Ctrl-C / SIGTERM or until one of them
exits; then it stops them all (SIGTERM to each process group, SIGKILL after a timeout).

``--device cpu`` (the CPU build of vLLM, see scripts/vllm-cpu-env) gives each server its own
cores through ``VLLM_CPU_OMP_THREADS_BIND`` and ``VLLM_CPU_KVCACHE_SPACE`` GiB of KV cache;
``--device gpu`` gives each server ``--gpus-per-server`` GPUs through ``CUDA_VISIBLE_DEVICES``
(and ``--tensor-parallel-size`` when more than one). Every server gets
``--enable-prompt-tokens-details`` so pdlb can report the prefill's cached tokens.

The same machinery is importable for test fixtures::

    with VllmPool(LaunchConfig(model=str(model_dir), base_port=0)) as pool:
        pool.prefill_urls, pool.decode_urls

The plan (argv, environment, ports per server) is a pure function, :func:`plan_servers`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

Role = Literal["prefill", "decode"]
Device = Literal["cpu", "gpu"]
Connector = Literal["nixl", "shared_storage"]

DEFAULT_BASE_PORT = 8100
DEFAULT_SIDE_CHANNEL_PORT = 5600
# Room between two servers' NIXL side-channel ports: vLLM adds the data-parallel index.
SIDE_CHANNEL_STRIDE = 10
DECODE_PORT_OFFSET = 100

_REPO_ROOT = Path(__file__).resolve().parent.parent


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
) -> str:
    """A pdlb backends.toml for these pools (JSON strings are valid TOML basic strings)."""

    def backends(urls: Sequence[str]) -> str:
        items = ",\n".join(f"    {{ url = {json.dumps(u)} }}" for u in urls)
        return f"[\n{items},\n]"

    return (
        "# Written by `pdlb launch-vllm`.\n"
        "[server]\n"
        f"host = {json.dumps(lb_host)}\n"
        f"port = {lb_port}\n\n"
        "[pools.prefill]\n"
        'policy = "round_robin"\n'
        f"backends = {backends(prefill_urls)}\n\n"
        "[pools.decode]\n"
        'policy = "least_tokens"\n'
        f"backends = {backends(decode_urls)}\n\n"
        "[kv_transfer]\n"
        f"connector = {json.dumps(connector)}\n"
    )


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
            return int(resp.status) == 200
    except (OSError, urllib.error.URLError):
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class _Running:
    plan: ServerPlan
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    started_at: float


@dataclass
class VllmPool:
    """Start the servers of ``config``, wait for their health, stop them all on exit.

    ``start()`` raises VllmLaunchError (after stopping whatever it started) when a server
    exits or is not healthy within ``startup_timeout_s``; ``stop()`` is idempotent.
    ``stop_event`` (set it from a signal handler) aborts a start in progress.
    """

    config: LaunchConfig
    stop_event: threading.Event = field(default_factory=threading.Event)
    servers: list[ServerPlan] = field(default_factory=list, init=False)
    run_dir: Path = field(init=False)
    _running: list[_Running] = field(default_factory=list, init=False)
    _startup_times: dict[str, float] = field(default_factory=dict, init=False)

    @property
    def prefill_urls(self) -> list[str]:
        return [s.url for s in self.servers if s.role == "prefill"]

    @property
    def decode_urls(self) -> list[str]:
        return [s.url for s in self.servers if s.role == "decode"]

    @property
    def startup_times(self) -> dict[str, float]:
        """Seconds from spawn to the first healthy answer, per server name."""
        return dict(self._startup_times)

    def log_path(self, name: str) -> Path:
        return next(s.log_path for s in self.servers if s.name == name)

    def start(self) -> VllmPool:
        vllm = self.config.vllm or find_vllm()
        if self.config.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix="pdlb-vllm-"))
        else:
            self.run_dir = self.config.run_dir.resolve()
        self.servers = plan_servers(self.config, vllm=vllm, run_dir=self.run_dir)
        base_env = dict(os.environ)
        if self.config.device == "cpu":
            # The CPU recipe keeps vLLM's caches out of $HOME; on GPUs vLLM's default cache
            # (torch.compile artefacts) is worth keeping between runs.
            base_env.setdefault("VLLM_CACHE_ROOT", str(self.run_dir / "vllm-cache"))
        try:
            for plan in self.servers:
                plan.log_path.parent.mkdir(parents=True, exist_ok=True)
                Path(plan.env["TMPDIR"]).mkdir(parents=True, exist_ok=True)
                log = plan.log_path.open("ab")
                log.write(f"$ {shlex.join(plan.argv)}\n".encode())
                log.flush()
                proc = subprocess.Popen(
                    plan.argv,
                    env={**base_env, **plan.env},
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: stop() kills the tree
                )
                self._running.append(_Running(plan, proc, log, time.monotonic()))
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        pending = list(self._running)
        while pending:
            for r in list(pending):
                if r.proc.poll() is not None:
                    raise VllmLaunchError(
                        f"{r.plan.name} exited with {r.proc.returncode} while starting; "
                        f"log {r.plan.log_path}:\n{_tail(r.plan.log_path)}"
                    )
                if _healthy(r.plan.url):
                    self._startup_times[r.plan.name] = time.monotonic() - r.started_at
                    pending.remove(r)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(r.plan.name for r in pending)
                raise VllmLaunchError(
                    f"not healthy after {self.config.startup_timeout_s:.0f} s: {names}; "
                    f"logs in {self.run_dir / 'logs'}"
                )
            if self.stop_event.wait(0.5):
                raise VllmLaunchError("stopped while waiting for the servers to start")

    def check_alive(self) -> None:
        """Raise VllmLaunchError naming the first server whose process has exited."""
        for r in self._running:
            if r.proc.poll() is not None:
                raise VllmLaunchError(
                    f"{r.plan.name} exited with {r.proc.returncode}; "
                    f"log {r.plan.log_path}:\n{_tail(r.plan.log_path)}"
                )

    def stop(self) -> None:
        """SIGTERM every server's process group, SIGKILL what is left after the timeout."""
        running, self._running = self._running, []
        for r in running:
            _signal_group(r.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_timeout_s
        for r in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for r in running:
            # The API server may be gone while its engine processes linger: kill the group.
            _signal_group(r.proc, signal.SIGKILL)
            r.proc.wait()
            r.log.close()
        for r in running:
            _wait_group_gone(r.proc.pid, timeout_s=5.0)
        self._running = []

    def __enter__(self) -> VllmPool:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # start_new_session=True made the child a group leader: its pid is the group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Wait until no process of the group is left (SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pdlb launch-vllm",
        description="Start local vLLM prefill/decode pools and write a pdlb backends.toml.",
    )
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument("--prefill", type=int, default=1, help="prefill servers (default 1)")
    p.add_argument("--decode", type=int, default=1, help="decode servers (default 1)")
    p.add_argument(
        "--vllm",
        help="a vllm executable or the python of a venv with vLLM "
        "(default: vllm on PATH, else .venv-vllm/bin/vllm)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address the servers bind")
    p.add_argument(
        "--base-port",
        type=int,
        default=DEFAULT_BASE_PORT,
        help="prefill i listens on BASE+i, decode j on BASE+100+j; 0 picks free ports",
    )
    p.add_argument(
        "--side-channel-port",
        type=int,
        default=DEFAULT_SIDE_CHANNEL_PORT,
        help="NIXL side-channel port of server k is PORT+10*k; 0 picks free ports",
    )
    p.add_argument(
        "--side-channel-host",
        help="VLLM_NIXL_SIDE_CHANNEL_HOST: the address decode servers reach prefill's side "
        "channel at (default: --host)",
    )
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--served-model-name", help="model name clients use (default: dir name)")
    p.add_argument("--connector", choices=["nixl", "shared_storage"], default="nixl")
    p.add_argument("--shared-storage-path", help="folder for --connector shared_storage")
    p.add_argument("--max-model-len", type=int)
    p.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pass --enforce-eager to vLLM (default: on for cpu, off for gpu)",
    )
    p.add_argument(
        "--extra-vllm-args",
        default="",
        help="more `vllm serve` arguments for every server, one shell-quoted string",
    )
    p.add_argument(
        "--cpu-kvcache-space", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE GiB (cpu)"
    )
    p.add_argument(
        "--nixl-progress-delay-us",
        type=int,
        help="poll timeout of NIXL's UCX progress thread, for the NIXL patched by "
        "scripts/vllm-cpu-env (default: 1000 on cpu, NIXL's own 0 = busy spin on gpu)",
    )
    p.add_argument("--gpus-per-server", type=int, default=1, help="(gpu) also the TP size")
    p.add_argument("--gpus", help="(gpu) comma-separated GPU ids to share out (default 0..)")
    p.add_argument("--write-config", type=Path, help="write a pdlb backends.toml here")
    p.add_argument("--lb-host", default="127.0.0.1", help="[server] host in --write-config")
    p.add_argument("--lb-port", type=int, default=8000, help="[server] port in --write-config")
    p.add_argument(
        "--run-dir",
        type=Path,
        help="logs/ (one file per server), tmp/ and (cpu) vllm-cache/ go here "
        "(default: a new temp dir)",
    )
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds")
    p.add_argument("--stop-timeout", type=float, default=30.0, help="seconds before SIGKILL")
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
        device=args.device,
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


if __name__ == "__main__":
    sys.exit(main())
