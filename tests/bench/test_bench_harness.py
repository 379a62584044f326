"""bench/: the mock backend speaks both PD handshakes, the client's checks catch what they
should, and pdlb passes every check of the comparison harness end to end (small and fast)."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import client  # noqa: E402
import compare  # noqa: E402
import mock_backend  # noqa: E402


@pytest.fixture(scope="module")
def mock() -> Iterator[dict[str, Any]]:
    proc = subprocess.Popen([sys.executable, str(BENCH / "mock_backend.py"), "--itl-ms", "0.2"],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    info: dict[str, Any] = json.loads(proc.stdout.readline())
    yield info
    proc.stdout.close()
    proc.terminate()
    proc.wait(timeout=10)


def run_client(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(BENCH / "client.py"), *args], capture_output=True,
                         text=True, timeout=90, check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def stats(mock: dict[str, Any]) -> dict[str, Any]:
    _, raw = compare.http_call(mock["decode"] + "/mock/stats")
    result: dict[str, Any] = json.loads(raw)
    return result


def test_direct_path_streams_everything_with_a_nixl_handoff(mock: dict[str, Any]) -> None:
    for endpoint in ("completions", "chat"):
        r = run_client("latency", "--direct", mock["prefill"], mock["decode"], "--n", "3",
                       "--warmup", "1", "--tokens", "8", "--endpoint", endpoint)
        assert r["ok"] == 3 and r["errors"] == 0
        assert r["tally"]["kv_ok"] == 3 and r["tally"]["usage_ok"] == 3
        # The direct path passes the decode's usage on, and the decode (like vLLM in PD
        # mode) counts the pulled KV as cached: the client must notice.
        assert "cached_true" not in r["tally"]


def test_decode_rejects_params_the_prefill_never_issued(mock: dict[str, Any]) -> None:
    compare.http_call(mock["decode"] + "/mock/reset", "POST", b"{}")
    body = {"prompt": "x" * 40, "max_tokens": 2, "stream": False, "kv_transfer_params": {
        "do_remote_prefill": True, "remote_engine_id": mock_backend.ENGINE_ID,
        "remote_request_id": "never-issued", "remote_host": "localhost", "remote_port": 5600,
        "remote_block_ids": [[1, 2, 3, 4]]}}
    status, raw = compare.http_call(mock["decode"] + "/v1/completions", "POST",
                                    orjson.dumps(body))
    assert status == 200 and orjson.loads(raw)["system_fingerprint"] == "kv-bad"
    assert stats(mock)["decode_kv_bad"] == 1


def test_sglang_bootstrap_rooms_are_matched(mock: dict[str, Any]) -> None:
    compare.http_call(mock["decode"] + "/mock/reset", "POST", b"{}")
    body = orjson.dumps({"prompt": "hello there", "max_tokens": 3, "stream": True,
                         "bootstrap_host": "127.0.0.1", "bootstrap_port": 8998,
                         "bootstrap_room": 12345})
    for url in (mock["prefill"], mock["decode"]):
        status, raw = compare.http_call(url + "/v1/completions", "POST", body)
        assert status == 200 and raw.rstrip().endswith(b"data: [DONE]")
    st = stats(mock)
    assert st["decode_bootstrap"] == 1 and st["bootstrap_rooms_matched"] == 1


def test_mock_answers_health_models_metrics_and_404(mock: dict[str, Any]) -> None:
    assert compare.http_call(mock["prefill"] + "/health")[0] == 200
    status, raw = compare.http_call(mock["decode"] + "/v1/models")
    assert status == 200 and orjson.loads(raw)["data"][0]["id"] == mock_backend.MODEL
    status, raw = compare.http_call(mock["decode"] + "/metrics")
    assert status == 200 and b"vllm:num_requests_running" in raw
    assert compare.http_call(mock["decode"] + "/nope")[0] == 404


def _workload(tokens: int = 3) -> client.Workload:
    args = argparse.Namespace(endpoint="completions", tokens=tokens, prompt="abcd" * 10,
                              direct=None, url="http://127.0.0.1:9")
    return client.Workload(args)


def _sse(events: list[dict[str, Any]], done: bool = True) -> bytes:
    body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    return body + (b"data: [DONE]\n\n" if done else b"")


def _events(w: client.Workload, order: list[int], usage: dict[str, Any] | None,
            marker: str = "kv-ok") -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "text": f" t{i}"}]} for i in order]
    events[0]["system_fingerprint"] = marker
    if usage is not None:
        events.append({"choices": [], "usage": usage})
    return events


@pytest.mark.parametrize("case", ["good", "no_done", "order", "usage", "no_kv", "http"])
def test_client_check_flags_each_problem(case: str) -> None:
    w = _workload()
    p = w.expected_prompt
    usage = {"prompt_tokens": p, "completion_tokens": 3, "total_tokens": p + 3,
             "prompt_tokens_details": {"cached_tokens": 0}}
    r = client.Response(0.0)
    r.status = 200
    order = [0, 1, 2]
    if case == "order":
        order = [0, 2, 1]
    if case == "usage":
        usage = dict(usage, completion_tokens=2)
    r.body = _sse(_events(w, order, usage, "kv-none" if case == "no_kv" else "kv-ok"),
                  done=case != "no_done")
    if case == "http":
        r.status = 502
    tally: Counter[str] = Counter()
    assert w.check(r, tally) == (case == "good")
    if case == "good":
        assert tally["cached_true"] == 1 and tally["kv_ok"] == 1


class _Sink:
    """Enough of a transport for the client's Conn."""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def test_client_reads_answers_split_anywhere_and_flags_cut_ones() -> None:
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    loop = asyncio.new_event_loop()
    try:
        for cut in range(1, len(raw)):
            conn = client.Conn()
            conn.transport = _Sink()
            done: asyncio.Future[client.Response] = loop.create_future()
            conn.request(b"", done, 0.0)
            conn.data_received(raw[:cut])
            conn.data_received(raw[cut:])
            r = done.result()
            assert (r.status, r.body, r.error, conn.closed) == (200, b"hello world", "", False)
        conn = client.Conn()
        conn.transport = _Sink()
        done = loop.create_future()
        conn.request(b"", done, 0.0)
        conn.data_received(raw[:-9])
        conn.connection_lost(None)
        assert done.result().error == "connection_lost"
    finally:
        loop.close()
    assert mock_backend._dechunk(body, 0) == (b"hello world", len(body))


def test_pdlb_passes_every_check_of_the_harness(mock: dict[str, Any], tmp_path: Path) -> None:
    started = compare.start_pdlb(mock["prefill"], mock["decode"], tmp_path,
                                 argparse.Namespace())
    try:
        r = run_client("rate", "--url", started.url, "--rate", "40", "--duration", "0.5",
                       "--tokens", "16")
        assert r["requests"] == 20 and r["ok"] == 20, r
        # pdlb stitches the prefill's usage in: cached_tokens is the truth (0).
        assert r["tally"]["kv_ok"] == 20 and r["tally"]["cached_true"] == 20
        assert compare.tree_cpu(started.pids()) > 0
    finally:
        started.stop()


def test_table_renders_ratios_and_correctness() -> None:
    args = argparse.Namespace(tokens=64, rate=100.0, duration=8.0)

    def measured(name: str, ttft: float, cpu_s: float) -> compare.Measured:
        lat = {"ttft_ms": {"p50": ttft, "p99": ttft * 2}, "e2e_ms": {"p50": 80.0, "p99": 90.0},
               "tally": {"ok": 10, "tokens_ok": 10, "done_ok": 10, "usage_ok": 10,
                         "kv_ok": 10, "cached_true": 10}}
        rate = {"ok": 800, "proxy_cpu_s": cpu_s, "tally": {"ok": 800}, "ttft_ms": lat["ttft_ms"]}
        return compare.Measured(name, latency=lat, rate64=rate,
                                rate8=dict(rate, proxy_cpu_s=cpu_s / 2), closed={"rps": 300})

    results = [measured("direct", 1.0, 0.0), measured("pdlb", 1.5, 1.2),
               measured("vllm-router", 1.3, 0.8)]
    text = compare.table(results, args)
    assert "| pdlb | +0.50 / +1.00 |" in text and "1.500" in text
    assert "pdlb / vllm-router: CPU per request (and per chunk) 1.50x" in compare.ratios(
        results, args)
    again = [measured("direct", 1.0, 0.0), measured("pdlb", 1.7, 1.32),
             measured("vllm-router", 1.3, 0.8)]
    spread = compare.noise([results, again])
    assert "| pdlb | 1.500 – 1.650 (10%) | +0.50 – +0.70 |" in spread


def test_micro_benchmark_cases_all_run() -> None:
    """bench/micro.py calls pdlb's internals directly: fail here when one of them moves."""
    import micro

    loop = asyncio.new_event_loop()
    try:
        cases = micro.cases(loop)
        assert len(cases) > 20
        for fn in cases.values():
            fn()
    finally:
        loop.close()
