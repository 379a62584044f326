"""`pdlb launch-vllm` without vLLM: the plan, the backends.toml, and process handling.

Process tests use a fake ``vllm`` executable (a small Python script serving /health) so
start, health wait, crash detection, Ctrl-C and the SIGKILL fallback run for real in a
second or two. The real servers are exercised by test_vllm_e2e.py.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

from lb.cli import main as pdlb_main
from lb.config import load_config
from lb.tools.launch_vllm import (
    LaunchConfig,
    VllmLaunchError,
    VllmPool,
    backends_toml,
    find_vllm,
    main,
    plan_servers,
    split_cpus,
)
from lb.tools.launch_vllm import plan as launch_plan
from lb.tools.launch_vllm.cli import _parser, config_from_args

VLLM = ("/opt/vllm/bin/vllm",)


def _plan(tmp_path: Path, **kw: object) -> list:
    config = LaunchConfig(model=str(tmp_path), served_model_name="tiny", **kw)  # type: ignore[arg-type]
    return plan_servers(config, vllm=VLLM, run_dir=tmp_path / "run", cpus=[0, 1])


def _flag(argv: tuple[str, ...], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_cpu_plan_one_prefill_one_decode(tmp_path):
    """1P1D on CPU: fixed ports, NIXL roles, one core each, side channels, CPU flags."""
    prefill, decode = _plan(tmp_path)
    assert (prefill.name, prefill.url) == ("prefill-0", "http://127.0.0.1:8100")
    assert (decode.name, decode.url) == ("decode-0", "http://127.0.0.1:8200")
    assert prefill.argv[:3] == (*VLLM, "serve", str(tmp_path.resolve()))
    for plan, role in ((prefill, "kv_producer"), (decode, "kv_consumer")):
        kv = json.loads(_flag(plan.argv, "--kv-transfer-config"))
        assert kv == {"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu"}
        assert "--enable-prompt-tokens-details" in plan.argv
        assert "--enforce-eager" in plan.argv
        assert _flag(plan.argv, "--served-model-name") == "tiny"
        assert _flag(plan.argv, "--dtype") == "bfloat16"
        assert plan.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
        assert plan.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
        assert plan.env["PDLB_NIXL_PTHR_DELAY_US"] == "1000"
        assert "CUDA_VISIBLE_DEVICES" not in plan.env
    assert prefill.env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert decode.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert (prefill.side_channel_port, decode.side_channel_port) == (5600, 5610)
    assert prefill.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5600"
    assert prefill.log_path == tmp_path / "run" / "logs" / "prefill-0.log"
    assert prefill.env["TMPDIR"] != decode.env["TMPDIR"]


def test_gpu_plan_gives_each_server_its_gpus(tmp_path):
    """GPU: CUDA_VISIBLE_DEVICES per server, TP size = GPUs per server, cuda KV buffer."""
    plans = _plan(tmp_path, device="gpu", prefill=2, decode=1, gpus_per_server=2,
                  gpus=(4, 5, 6, 7, 0, 1), extra_vllm_args=("--max-num-seqs", "64"))
    assert [p.name for p in plans] == ["prefill-0", "prefill-1", "decode-0"]
    assert [p.port for p in plans] == [8100, 8101, 8200]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["4,5", "6,7", "0,1"]
    for plan in plans:
        assert _flag(plan.argv, "--tensor-parallel-size") == "2"
        kv = json.loads(_flag(plan.argv, "--kv-transfer-config"))
        assert kv["kv_buffer_device"] == "cuda"
        assert "--enforce-eager" not in plan.argv
        assert "VLLM_CPU_OMP_THREADS_BIND" not in plan.env
        assert "PDLB_NIXL_PTHR_DELAY_US" not in plan.env
        assert plan.argv[-2:] == ("--max-num-seqs", "64")


def test_gpu_plan_needs_enough_gpus(tmp_path):
    """Asking for more GPUs than --gpus lists is refused before anything starts."""
    with pytest.raises(VllmLaunchError, match="need 4 GPUs"):
        _plan(tmp_path, device="gpu", gpus_per_server=2, gpus=(0, 1))


def test_free_ports_and_side_channel_host(tmp_path):
    """base_port=0 / side_channel_port=0 pick distinct free ports; side host is settable."""
    plans = _plan(tmp_path, base_port=0, side_channel_port=0, side_channel_host="10.0.0.5",
                  prefill=2, decode=2)
    ports = [p.port for p in plans] + [p.side_channel_port for p in plans]
    assert len(set(ports)) == 8 and all(isinstance(p, int) and p > 0 for p in ports)
    assert {p.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] for p in plans} == {"10.0.0.5"}


def test_shared_storage_connector(tmp_path):
    """shared_storage: vLLM's ExampleConnector with a path, no NIXL side channel."""
    with pytest.raises(VllmLaunchError, match="shared-storage-path"):
        _plan(tmp_path, connector="shared_storage")
    prefill, _ = _plan(tmp_path, connector="shared_storage", shared_storage_path="/kv")
    kv = json.loads(_flag(prefill.argv, "--kv-transfer-config"))
    assert kv["kv_connector"] == "ExampleConnector"
    assert kv["kv_connector_extra_config"] == {"shared_storage_path": "/kv"}
    assert prefill.side_channel_port is None
    assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in prefill.env


def test_kv_events_plan(tmp_path):
    """--kv-events: prefix caching and a ZMQ publisher per server, each on its own port;
    without it neither flag (vLLM's own defaults apply)."""
    for plan in _plan(tmp_path):
        assert "--enable-prefix-caching" not in plan.argv
        assert "--kv-events-config" not in plan.argv
        assert plan.kv_events_port is None
    plans = _plan(tmp_path, kv_events=True, prefill=2, decode=1)
    assert [p.kv_events_port for p in plans] == [5200, 5210, 5220]
    for plan in plans:
        assert "--enable-prefix-caching" in plan.argv
        events = json.loads(_flag(plan.argv, "--kv-events-config"))
        assert events == {"enable_kv_cache_events": True, "publisher": "zmq",
                          "endpoint": f"tcp://*:{plan.kv_events_port}", "topic": "kv"}
    # The field names are vLLM's KVEventsConfig's (vllm/config/kv_events.py, 0.32).
    assert set(events) <= {"enable_kv_cache_events", "publisher", "endpoint",
                           "replay_endpoint", "buffer_steps", "hwm", "max_queue_size", "topic"}
    assert [p.kv_events_port for p in _plan(tmp_path, kv_events=True, kv_events_port=7000)] \
        == [7000, 7010]


def test_kv_events_free_ports(tmp_path):
    """kv_events_port=0 picks a distinct free port per server, below the kernel's ephemeral
    range (the engine binds it ~30 s later; a bind(0) port was seen taken by then)."""
    plans = _plan(tmp_path, kv_events=True, kv_events_port=0, base_port=0, prefill=2, decode=2)
    ports = [p.kv_events_port for p in plans]
    assert len(set(ports)) == 4 and all(isinstance(p, int) and p > 0 for p in ports)
    assert all(p < launch_plan._ephemeral_low() for p in ports if p is not None)
    for plan in plans:
        endpoint = json.loads(_flag(plan.argv, "--kv-events-config"))["endpoint"]
        assert endpoint == f"tcp://*:{plan.kv_events_port}"


def test_kv_events_cli_flags():
    """--kv-events and --kv-events-port reach the LaunchConfig; off by default."""
    base = ["--model", "m", "--vllm", sys.executable]
    config = config_from_args(_parser().parse_args(base))
    assert (config.kv_events, config.kv_events_port) == (False, 5200)
    config = config_from_args(_parser().parse_args([*base, "--kv-events",
                                                    "--kv-events-port", "0"]))
    assert (config.kv_events, config.kv_events_port) == (True, 0)


def test_hub_model_id_passes_through(tmp_path):
    """A model that is not a directory is a hub id: passed as is, and names the model."""
    config = LaunchConfig(model="meta-llama/Llama-3.1-8B-Instruct", device="gpu")
    prefill, _ = plan_servers(config, vllm=VLLM, run_dir=tmp_path)
    assert prefill.argv[2] == "meta-llama/Llama-3.1-8B-Instruct"
    assert _flag(prefill.argv, "--served-model-name") == "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize(
    ("cpus", "n", "expected"),
    [
        ([0, 1], 2, ["0", "1"]),
        ([0, 1, 2, 3, 4], 2, ["0,1,2", "3,4"]),
        ([3, 2, 1, 0], 4, ["0", "1", "2", "3"]),
        ([0], 2, ["0", "0"]),
        ([0, 1], 3, ["0", "1", "0"]),
    ],
)
def test_split_cpus(cpus, n, expected):
    """Cores are shared out as disjoint slices, or round-robin when too few."""
    assert split_cpus(cpus, n) == expected


def test_backends_toml_is_what_pdlb_loads(tmp_path):
    """The written backends.toml parses, and pdlb's own config loader accepts it."""
    text = backends_toml(["http://127.0.0.1:8100", "http://127.0.0.1:8101"],
                         ["http://127.0.0.1:8200"], lb_port=9000)
    data = tomllib.loads(text)
    assert data["server"] == {"host": "127.0.0.1", "port": 9000}
    assert data["pools"]["prefill"]["policy"] == "round_robin"
    assert [b["url"] for b in data["pools"]["prefill"]["backends"]] == [
        "http://127.0.0.1:8100", "http://127.0.0.1:8101"]
    assert data["pools"]["decode"] == {"policy": "least_tokens",
                                       "backends": [{"url": "http://127.0.0.1:8200"}]}
    assert data["kv_transfer"] == {"connector": "nixl"}
    path = tmp_path / "backends.toml"
    path.write_text(text)
    config = load_config(path)
    assert [b.url for b in config.pools["prefill"].backends] == [
        "http://127.0.0.1:8100", "http://127.0.0.1:8101"]
    assert config.server.port == 9000


def test_backends_toml_with_kv_events(tmp_path):
    """kv_events: [kv_events] on, kv_aware prefill routing, and exact token ids — the local
    model's tokenizer and chat template, or a prefill's /tokenize for a hub id."""
    model = tmp_path / "model"
    model.mkdir()
    text = backends_toml(["http://127.0.0.1:8100"], ["http://127.0.0.1:8200"],
                         kv_events=True, model_dir=model)
    data = tomllib.loads(text)
    assert data["kv_events"] == {"enabled": True}
    assert data["tokenizer"] == {"kind": "hf", "path": str(model.resolve())}
    assert data["pools"]["prefill"]["policy"] == "kv_aware"
    assert data["pools"]["decode"]["policy"] == "least_tokens"
    path = tmp_path / "backends.toml"
    path.write_text(text)
    config = load_config(path)
    assert config.kv_events.enabled and config.kv_events.discover
    assert (config.tokenizer.kind, config.tokenizer.path) == ("hf", str(model.resolve()))
    assert config.pools["prefill"].policy == "kv_aware"

    hub = tomllib.loads(backends_toml(["http://127.0.0.1:8100"], ["http://127.0.0.1:8200"],
                                      kv_events=True))
    assert hub["tokenizer"] == {"token_ids": "backend"} and hub["kv_events"]["enabled"]
    path.write_text(backends_toml(["http://127.0.0.1:8100"], ["http://127.0.0.1:8200"],
                                  kv_events=True))
    assert load_config(path).tokenizer.token_ids == "backend"
    plain = tomllib.loads(backends_toml(["http://127.0.0.1:8100"], ["http://127.0.0.1:8200"]))
    assert "kv_events" not in plain and "tokenizer" not in plain


def test_find_vllm(tmp_path, monkeypatch):
    """--vllm takes an executable or a python; a missing one is a clear error."""
    exe = tmp_path / "vllm"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert find_vllm(str(exe)) == (str(exe),)
    assert find_vllm(sys.executable)[1:] == ("-m", "vllm.entrypoints.cli.main")
    with pytest.raises(VllmLaunchError, match="not an executable"):
        find_vllm(str(tmp_path / "nope"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_vllm() == (str(exe),)


def test_find_vllm_falls_back_to_a_venv_vllm(tmp_path, monkeypatch):
    """No --vllm and none on PATH: .venv-vllm in the current directory, else in pdlb's own
    source checkout (whose root the launcher must know from where it lives)."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    assert (launch_plan._REPO_ROOT / "lb" / "tools" / "launch_vllm" / "plan.py").is_file()
    exe = tmp_path / ".venv-vllm" / "bin" / "vllm"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert find_vllm() == (str(exe.resolve()),)


def test_pdlb_launch_vllm_is_this_cli(capsys):
    """`pdlb launch-vllm` reaches this module's main (its --help names the command)."""
    with pytest.raises(SystemExit) as info:
        pdlb_main(["launch-vllm", "--help"])
    assert info.value.code == 0
    assert "usage: pdlb launch-vllm" in capsys.readouterr().out


def test_launch_vllm_help_has_examples_and_defaults(capsys):
    """--help shows examples that parse, and the defaults of the flags that have one."""
    with pytest.raises(SystemExit) as info:
        pdlb_main(["launch-vllm", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "pdlb serve --config backends.toml" in out
    for text in ("(default 1)", "(default 127.0.0.1)", "(default 8100: prefill 8100, decode 8200)",
                 "(default 5600)", "auto (default)", "(default nixl)", "(default 8000)",
                 "(default 600)", "(default 30)", "(default 5200)"):
        assert text in " ".join(out.split()), text
    # every example's launch-vllm line parses
    examples = out.split("examples:")[1].replace("\\\n", " ")
    lines = [ln.split("pdlb launch-vllm", 1)[1] for ln in examples.splitlines()
             if "pdlb launch-vllm" in ln]
    assert len(lines) == 4
    for line in lines:
        config_from_args(_parser().parse_args(shlex.split(line)))


# A stand-in for `vllm serve`: serves /health on --port; FAKE_MODE picks a misbehaviour.
FAKE_VLLM = textwrap.dedent(
    """\
    import http.server, os, signal, subprocess, sys, time
    args = sys.argv[1:]
    port = int(args[args.index("--port") + 1])
    mode = os.environ.get("FAKE_MODE", "ok")
    pids = os.environ["FAKE_PIDS"]
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    with open(pids, "a") as f:
        f.write(f"{os.getpid()} {child.pid}\\n")
    if mode == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "crash" and "--port" in args and port % 2 == 0:
        sys.exit(3)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    if mode == "die_later":
        import threading
        threading.Timer(1.0, lambda: os._exit(4)).start()
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    exe = tmp_path / "vllm"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    exe.chmod(0o755)
    pids = tmp_path / "pids"
    monkeypatch.setenv("FAKE_PIDS", str(pids))
    return exe, pids


def _all_pids(pids: Path) -> list[int]:
    return [int(p) for line in pids.read_text().splitlines() for p in line.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); only count running processes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def _config(exe: Path, tmp_path: Path, **kw: object) -> LaunchConfig:
    return LaunchConfig(model="m", vllm=(str(exe),), base_port=0, side_channel_port=0,
                        run_dir=tmp_path / "run", stop_timeout_s=2.0, **kw)  # type: ignore[arg-type]


def test_pool_starts_waits_and_stops_whole_groups(fake_vllm, tmp_path, monkeypatch):
    """Start waits for /health; stop leaves no process behind, children included."""
    exe, pids = fake_vllm
    with VllmPool(_config(exe, tmp_path)) as pool:
        assert len(pool.prefill_urls) == 1 and len(pool.decode_urls) == 1
        assert set(pool.startup_times) == {"prefill-0", "decode-0"}
        pool.check_alive()
        assert all(_alive(p) for p in _all_pids(pids))
        assert pool.log_path("decode-0").read_text().startswith("$ ")
    assert not [p for p in _all_pids(pids) if _alive(p)]


def test_pool_restarts_one_server(fake_vllm, tmp_path, monkeypatch):
    """restart(role, index) stops that server's whole group and starts it again on the same
    port, healthy; the other server is untouched."""
    exe, pids = fake_vllm
    with VllmPool(_config(exe, tmp_path)) as pool:
        url = pool.prefill_urls[0]
        before = [line.split() for line in pids.read_text().splitlines()]
        assert len(before) == 2
        took = pool.restart("prefill", 0)
        assert took > 0 and pool.startup_times["prefill-0"] == took
        after = [line.split() for line in pids.read_text().splitlines()]
        assert len(after) == 3
        assert pool.prefill_urls == [url]
        assert pool.log_path("prefill-0").read_text().count("$ ") == 2
        pool.check_alive()
        assert all(_alive(int(p)) for p in after[2])
        # of the first two spawns the prefill's group is gone (its child too), the decode's not
        dead = [s for s in before if not any(_alive(int(p)) for p in s)]
        alive = [s for s in before if all(_alive(int(p)) for p in s)]
        assert len(dead) == 1 and len(alive) == 1
        with pytest.raises(VllmLaunchError, match="no running decode-3"):
            pool.restart("decode", 3)
    assert not [p for p in _all_pids(pids) if _alive(p)]


def test_pool_sigkills_a_server_that_ignores_sigterm(fake_vllm, tmp_path, monkeypatch):
    """A server ignoring SIGTERM is killed after stop_timeout_s."""
    exe, pids = fake_vllm
    monkeypatch.setenv("FAKE_MODE", "ignore_term")
    pool = VllmPool(_config(exe, tmp_path)).start()
    started = time.monotonic()
    pool.stop()
    assert 1.5 < time.monotonic() - started < 10
    assert not [p for p in _all_pids(pids) if _alive(p)]
    pool.stop()  # idempotent


def test_pool_start_fails_when_a_server_exits(fake_vllm, tmp_path, monkeypatch):
    """A server that exits while starting fails start() with its log, and nothing is left."""
    exe, pids = fake_vllm
    monkeypatch.setenv("FAKE_MODE", "crash")
    config = LaunchConfig(model="m", vllm=(str(exe),), base_port=41000, side_channel_port=0,
                          run_dir=tmp_path / "run", stop_timeout_s=2.0)
    with pytest.raises(VllmLaunchError, match="exited with 3 while starting"):
        VllmPool(config).start()
    assert not [p for p in _all_pids(pids) if _alive(p)]


def test_pool_start_times_out(tmp_path):
    """A server that never becomes healthy fails start() after startup_timeout_s."""
    exe = tmp_path / "vllm"
    exe.write_text("#!/bin/sh\nexec sleep 600\n")
    exe.chmod(0o755)
    config = LaunchConfig(model="m", vllm=(str(exe),), base_port=0, side_channel_port=0,
                          run_dir=tmp_path / "run", startup_timeout_s=1.0, stop_timeout_s=2.0)
    with pytest.raises(VllmLaunchError, match="not healthy after 1 s"):
        VllmPool(config).start()


def _launch(exe: Path, tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lb.tools.launch_vllm", "--model", "m", "--vllm", str(exe),
         "--base-port", "0", "--side-channel-port", "0", "--run-dir", str(tmp_path / "run"),
         "--write-config", str(tmp_path / "backends.toml"), "--stop-timeout", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )


def _read_until(proc: subprocess.Popen[str], marker: str) -> str:
    seen = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        seen += line
        if marker in line:
            return seen
    raise AssertionError(f"no {marker!r} in output:\n{seen}")


def test_cli_ctrl_c_stops_everything(fake_vllm, tmp_path):
    """The CLI writes backends.toml, then Ctrl-C stops all servers and exits 0."""
    exe, pids = fake_vllm
    with _launch(exe, tmp_path, {"FAKE_MODE": "ok"}) as proc:
        try:
            out = _read_until(proc, "Ctrl-C stops them")
            assert "prefill-0: http://127.0.0.1:" in out and "healthy after" in out
            config = load_config(tmp_path / "backends.toml")
            assert len(config.pools["decode"].backends) == 1
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 0
        finally:
            proc.kill()
    assert not [p for p in _all_pids(pids) if _alive(p)]


def test_cli_exits_1_when_a_server_dies(fake_vllm, tmp_path):
    """When one server dies after start-up the CLI stops the rest and exits 1."""
    exe, pids = fake_vllm
    with _launch(exe, tmp_path, {"FAKE_MODE": "die_later"}) as proc:
        try:
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 1
            assert "exited with 4" in err
        finally:
            proc.kill()
    assert not [p for p in _all_pids(pids) if _alive(p)]


def test_main_reports_bad_arguments(capsys):
    """A bad --vllm is reported in one line with exit status 2."""
    assert main(["--model", "m", "--vllm", "/nonexistent/vllm"]) == 2
    assert "not an executable" in capsys.readouterr().err


def _fake_smi(tmp_path, lines: str, rc: int = 0):
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir(exist_ok=True)
    smi.write_text(f"#!/bin/sh\nprintf '{lines}'\nexit {rc}\n")
    smi.chmod(0o755)
    return str(smi.parent)


def test_device_auto_uses_the_gpus_nvidia_smi_lists(tmp_path, monkeypatch, capsys):
    from lb.tools.launch_vllm.cli import detect_gpus, resolve_device

    two = "GPU 0: NVIDIA H100 (UUID: GPU-a)\\nGPU 1: NVIDIA H100 (UUID: GPU-b)\\n"
    monkeypatch.setenv("PATH", _fake_smi(tmp_path, two))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert detect_gpus() == 2
    assert resolve_device("auto") == "gpu"
    assert "2 NVIDIA GPU(s) found, using gpu" in capsys.readouterr().err
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert detect_gpus() == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpus() == 0 and resolve_device("auto") == "cpu"
    assert resolve_device("gpu") == "gpu"  # asked for: never second-guessed


def test_device_auto_is_cpu_without_a_driver(tmp_path, monkeypatch):
    from lb.tools.launch_vllm.cli import detect_gpus, resolve_device

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert detect_gpus() == 0 and resolve_device("auto") == "cpu"
    # nvidia-smi present but failing (no driver loaded): cpu
    monkeypatch.setenv("PATH", _fake_smi(tmp_path, "NVIDIA-SMI has failed\\n", rc=9))
    assert detect_gpus() == 0 and resolve_device("auto") == "cpu"
