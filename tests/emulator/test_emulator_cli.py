"""The CLI as a real subprocess, the cluster helper, config validation, the tokenizer."""

from __future__ import annotations

import asyncio
import re
import signal
import sys

import pytest

from emulator import EmulatorCluster, EmulatorConfig
from emulator.cli import build_parser, config_from_args, config_to_argv
from emulator.tokens import WORDS, Tokenizer
from tests.emulator.conftest import post, state

PREFILL_KV = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
              "remote_block_ids": None, "remote_host": None, "remote_port": None}


async def test_cli_subprocess_prints_listening_line_and_stops_on_sigterm(http):
    """python -m emulator --port 0 prints one line with the URL, serves, exits 0 on SIGTERM."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "emulator", "--port", "0", "--role", "prefill",
        "--time-scale", "50", "--model", "m", "--no-enable-prompt-tokens-details",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        match = re.fullmatch(r"emulator listening on (http://127\.0\.0\.1:(\d+))\n", line)
        assert match, line
        url = match.group(1)
        status, body = await post(http, url + "/v1/completions", {
            "model": "m", "prompt": "hi", "max_tokens": 1, "kv_transfer_params": PREFILL_KV})
        assert status == 200 and body["usage"]["prompt_tokens_details"] is None
        assert body["kv_transfer_params"]["remote_port"] == int(match.group(2))
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert await proc.stdout.read() == b""  # exactly one line on stdout
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        assert proc.stderr is not None
        await proc.stderr.read()


async def test_cli_rejects_bad_values():
    """A bad flag value exits with status 2 and a message naming the field."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "emulator", "--role", "middle",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 2 and b"role" in err and out == b""


def test_config_round_trips_through_flags():
    """Every field is a flag; config_to_argv reproduces a config."""
    config = EmulatorConfig(role="decode", time_scale=7.5, side_channel_port=5600,
                            drop_after_chunks=3, omit_kv_params=True, add_bos=False,
                            api_key="k", kv_load_failure_policy="recompute")
    args = build_parser().parse_args(config_to_argv(config))
    assert config_from_args(args) == config
    with pytest.raises(ValueError, match="fail_rate"):
        EmulatorConfig(fail_rate=1.5)
    with pytest.raises(ValueError, match="kv_capacity_tokens"):
        EmulatorConfig(kv_capacity_tokens=1000)  # less than max_model_len 8192


async def test_cluster_in_process_serves_a_pd_request(http):
    """EmulatorCluster starts prefill and decode servers; a PD request pulls KV."""
    async with EmulatorCluster(prefill=1, decode=2, time_scale=50) as cluster:
        assert len(cluster.prefill_urls) == 1 and len(cluster.decode_urls) == 2
        assert cluster.both_urls == []
        p, d = cluster.prefill_urls[0], cluster.decode_urls[1]
        _, first = await post(http, p + "/v1/completions", {
            "prompt": "hello", "max_tokens": 1, "kv_transfer_params": PREFILL_KV})
        status, _ = await post(http, d + "/v1/completions", {
            "prompt": "hello", "max_tokens": 3, "kv_transfer_params": first["kv_transfer_params"]})
        assert status == 200 and (await state(http, d))["kv_pulled"] == 1


async def test_cluster_subprocess_mode(http):
    """mode='subprocess' runs each emulator as its own process, all stopped on exit."""
    async with EmulatorCluster(prefill=1, decode=1, mode="subprocess", time_scale=50) as cluster:
        p, d = cluster.prefill_urls[0], cluster.decode_urls[0]
        _, first = await post(http, p + "/v1/completions", {
            "prompt": "hello", "max_tokens": 1, "kv_transfer_params": PREFILL_KV})
        assert first["kv_transfer_params"]["remote_port"] == int(p.rsplit(":", 1)[1])
        status, _ = await post(http, d + "/v1/completions", {
            "prompt": "hello", "max_tokens": 3, "kv_transfer_params": first["kv_transfer_params"]})
        assert status == 200 and (await state(http, d))["kv_pulled"] == 1
        assert (await state(http, d))["role"] == "decode"
        procs = list(cluster.processes)
    assert all(proc.returncode == 0 for proc in procs)


def test_output_words_are_single_tokens_and_chat_template_counts():
    """Each output word is one cl100k token; the chat template's cost is as documented."""
    tok = Tokenizer()
    assert len(set(WORDS)) == 128
    assert all(len(tok.encode(" " + w)) == 1 for w in WORDS)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Name three rivers."}]}]
    expected = 1 + sum(4 + len(tok.encode(m)) + len(tok.encode(c))
                       for m, c in (("system", "Be brief."), ("user", "Name three rivers."))) + 4
    assert len(tok.render_chat(messages)) == expected
