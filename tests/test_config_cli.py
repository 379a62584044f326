"""backends.toml parsing and the CLI's one-line errors (exit code 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lb.config import ConfigError, load_config, override

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "backends.toml"
    path.write_text(text)
    return path


def test_example_config_is_valid():
    """The shipped backends.toml parses and builds an app (policies and connector load)."""
    from lb.serve.app import create_app

    config = load_config(REPO / "backends.toml")
    assert config.prefill.backends and config.decode.backends
    create_app(config)


def test_full_config(tmp_path):
    path = write(tmp_path, """
[server]
host = "0.0.0.0"
port = 9000
max_body_bytes = 1000
[server.timeouts]
connect_s = 1
idle_s = 2.5
[pools.prefill]
policy = "round_robin"
max_inflight_tokens = 10000
backends = [{ url = "http://10.0.0.1:8100/" }, { url = "http://10.0.0.2:8100", max_inflight_tokens = 500 }]
[pools.decode]
policy = "least_tokens"
backends = ["http://10.0.0.3:8200"]
[kv_transfer]
connector = "nixl"
rewrite_remote_host = "always"
[tokenizer]
kind = "estimate"
""")
    c = load_config(path)
    assert c.server.port == 9000 and c.server.timeouts.idle_s == 2.5
    assert c.prefill.backends[0].url == "http://10.0.0.1:8100"
    assert c.prefill.backends[1].max_inflight_tokens == 500
    assert c.prefill.max_inflight_tokens == 10000
    assert c.decode.backends[0].url == "http://10.0.0.3:8200"
    assert c.kv_transfer.options == {"rewrite_remote_host": "always"}
    c2 = override(c, decode=["http://127.0.0.1:1"], port=1)
    assert c2.decode.backends[0].url == "http://127.0.0.1:1" and c2.server.port == 1
    assert c2.prefill == c.prefill


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("[pools.prefill]\nbackends=[]\n[pools.decode]\nbackends=['http://a:1']",
         "pools.prefill.backends"),
        ("[pools.prefill]\nbackends=['ftp://a']\n[pools.decode]\nbackends=['http://a:1']",
         "pools.prefill.backends[0]"),
        ("[pools.prefill]\nbackends=['http://a:1/v1']\n[pools.decode]\nbackends=['http://a:1']",
         "without a path"),
        ("[pools.prefill]\nbackends=['http://a:1']", "pools.decode"),
        ("[pools.prefill]\nbackends=['http://a:1']\n[pools.decode]\nbackends=['http://a:2']\n"
         "[server]\nport='x'", "server.port = 'x'"),
        ("[pools.prefill]\nbackends=['http://a:1']\n[pools.decode]\nbackends=['http://a:2']\n"
         "[server]\nprot=1", "server.prot: unknown key"),
        ("[pools.prefill]\nbackends=['http://a:1']\n[pools.decode]\nbackends=['http://a:2']\n"
         "[server.timeouts]\nidle_s=-1", "server.timeouts.idle_s"),
        ("[pools.prefill]\nbackends=['http://a:1']\n[pools.decode]\nbackends=['http://a:2']\n"
         "[tokenizer]\nkind='hf'", "tokenizer.path"),
        ("not = [valid", "not valid TOML"),
    ],
)
def test_bad_configs_name_key_and_value(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and fragment in str(info.value)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lb.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def test_cli_missing_config_exits_2_with_one_line():
    result = run_cli("serve", "--config", "/nonexistent/backends.toml")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "/nonexistent/backends.toml" in lines[0]


def test_cli_unknown_policy_lists_available(tmp_path):
    path = write(tmp_path, "[pools.prefill]\npolicy='nope'\nbackends=['http://a:1']\n"
                           "[pools.decode]\nbackends=['http://a:2']")
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert "pools.prefill.policy = 'nope'" in result.stderr and "round_robin" in result.stderr


def test_cli_unknown_connector(tmp_path):
    path = write(tmp_path, "[pools.prefill]\nbackends=['http://a:1']\n"
                           "[pools.decode]\nbackends=['http://a:2']\n[kv_transfer]\nconnector='zz'")
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2 and "kv_transfer.connector = 'zz'" in result.stderr


def test_cli_needs_backends():
    result = run_cli("serve")
    assert result.returncode == 2 and "--prefill" in result.stderr


def test_cli_bad_flag_url():
    result = run_cli("serve", "--prefill", "nope", "--decode", "http://a:1")
    assert result.returncode == 2 and "'nope'" in result.stderr


def test_cli_serve_prints_listening_line_and_stops_on_sigterm():
    with subprocess.Popen(
        [sys.executable, "-m", "lb.cli", "serve", "--prefill", "http://127.0.0.1:9",
         "--decode", "http://127.0.0.1:9", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("pdlb listening on http://127.0.0.1:")
            proc.terminate()
            assert proc.wait(timeout=20) == 0
        finally:
            proc.kill()


def test_cli_connector_startup_check_failure_exits_2(tmp_path):
    """A start-up check that needs the network (sglang bootstrap) fails with one line."""
    path = write(tmp_path, "[pools.prefill]\nbackends=['http://127.0.0.1:9']\n"
                           "[pools.decode]\nbackends=['http://127.0.0.1:19']\n"
                           "[kv_transfer]\nconnector='sglang'\nbootstrap_port=9\n"
                           "startup_timeout_s=0.5\n")
    result = run_cli("serve", "--config", str(path), "--port", "0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bootstrap" in lines[0] and "http://127.0.0.1:9" in lines[0]


@pytest.mark.parametrize("table, message", [
    ("[server]\nport = 70000", "server.port = 70000: must be <= 65535"),
    ("[tokenizer]\ncount = 'sometimes'",
     "tokenizer.count = 'sometimes': expected \"when_needed\" or \"always\""),
    ("[kv_transfer]\nconnector = 'mooncake'\nbootstrap_port = '1'",
     "kv_transfer.bootstrap_port = '1': expected an integer"),
    ("[kv_transfer]\nconnector = 'nixl'\nrewrite = 1",
     "kv_transfer.rewrite: unknown key for connector 'nixl' (known here: rewrite_remote_host)"),
    ("[pools.prefill.policy_options]\nload_factor = 0.5",
     "pools.prefill.policy_options.load_factor = 0.5: must be >= 1"),
    ("[pools.prefill.policy_options]\nlod_factor = 1",
     "pools.prefill.policy_options.lod_factor: unknown key for policy 'prefix_affinity'"),
])
def test_one_checker_one_message_shape(tmp_path, table, message):
    """backends.toml's own tables, connector options and policy options are read by the same
    checker (policies/options.py): every error is 'FILE: dotted.key = value: why'."""
    from lb.serve.app import create_app

    path = write(tmp_path, "[pools.prefill]\nbackends=['http://a:1']\npolicy='prefix_affinity'\n"
                           "[pools.decode]\nbackends=['http://a:2']\n" + table)
    with pytest.raises(ConfigError) as info:
        create_app(load_config(path))
    assert str(info.value).startswith(f"{path}: {message}")
