"""Retries, fallbacks, limits, client keys, the admin API, hot reload and graceful drain."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import make_config
from tests.fake_vllm import FakeBehaviour, make_fake, run_app
from tests.test_proxy_edges import sse_events

DEAD = "http://127.0.0.1:9"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_prefill_retried_on_another_backend(start_pdlb, http):
    """A prefill backend that omits kv params is skipped for another; one clean answer."""
    bad, good, d = FakeBehaviour(omit_kv_params=True), FakeBehaviour(), FakeBehaviour()
    async with run_app(make_fake("prefill", bad)) as b1, run_app(make_fake("prefill", good)) as b2, \
            run_app(make_fake("decode", d)) as du:
        url, _ = await start_pdlb(make_config([b1, b2], [du]))
        for _ in range(2):
            async with http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}) as r:
                assert r.status == 200
        assert len(good.requests) == 2 and 1 <= len(bad.requests) <= 2
        async with http.get(url + "/metrics") as r:
            retries = f'pdlb_retries_total{{leg="prefill",reason="missing_kv_transfer_params"}} {len(bad.requests)}.0'
            assert retries in await r.text()


async def test_decode_unreachable_retried_with_same_handoff(start_pdlb, http):
    p, d = FakeBehaviour(), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        cfg = make_config([pu], [DEAD, du], pools={"decode": {"policy": "round_robin"}},
                          health={"interval_s": 60, "failures_to_eject": 5})
        url, _ = await start_pdlb(cfg)
        async with http.post(url + "/v1/completions",
                             json={"prompt": "x", "max_tokens": 2, "stream": True}) as r:
            assert r.status == 200
            events = sse_events(await r.read())
        assert events[-1] == "[DONE]" and len(d.requests) == 1
        assert len(p.requests) == 1  # connection refused: the KV was never touched


async def test_decode_5xx_redoes_prefill_then_succeeds(start_pdlb, http):
    p, bad, good = FakeBehaviour(), FakeBehaviour(status=500), FakeBehaviour()
    bad.error_body = b'{"error": {"message": "decode crashed"}}'
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", bad)) as d1, \
            run_app(make_fake("decode", good)) as d2:
        cfg = make_config([pu], [d1, d2], pools={"decode": {"policy": "round_robin"}},
                          health={"interval_s": 60, "failures_to_eject": 5})
        url, _ = await start_pdlb(cfg)
        async with http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}) as r:
            assert r.status == 200
        assert len(bad.requests) == 1 and len(good.requests) == 1
        assert len(p.requests) == 2  # the KV may have been consumed: prefill again


async def test_decode_only_fallback_when_prefill_pool_is_down(start_pdlb, http):
    d = FakeBehaviour()
    async with run_app(make_fake("decode", d)) as du:
        cfg = make_config([DEAD], [du], resilience={"prefill_fallback": "decode_only"},
                          health={"interval_s": 0.05, "timeout_s": 0.2})
        url, _ = await start_pdlb(cfg)
        async with http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}) as r:
            assert r.status == 200
            data = await r.json()
        assert "kv_transfer_params" not in d.requests[0]["body"]
        assert data["choices"][0]["text"] == "t0 t1"


async def test_short_prompts_skip_the_prefill_hop(start_pdlb, http):
    p, d = FakeBehaviour(), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        cfg = make_config([pu], [du], resilience={"direct_decode_below_tokens": 50})
        url, _ = await start_pdlb(cfg)
        async with http.post(url + "/v1/completions", json={"prompt": "short", "max_tokens": 2}) as r:
            assert r.status == 200
        async with http.post(url + "/v1/completions",
                             json={"prompt": "long " * 100, "max_tokens": 2}) as r:
            assert r.status == 200
        assert len(p.requests) == 1 and len(d.requests) == 2
        async with http.get(url + "/metrics") as r:
            assert "pdlb_direct_decode_total 1.0" in await r.text()


async def test_limits(start_pdlb, http):
    p, d = FakeBehaviour(delay_s=0.5), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        cfg = make_config([pu], [du], server={"port": 0, "max_prompt_tokens": 10,
                                              "max_tokens_limit": 100,
                                              "max_concurrent_requests": 1})
        url, _ = await start_pdlb(cfg)
        async with http.post(url + "/v1/completions", json={"prompt": "a " * 50}) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "prompt_too_long"
        async with http.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 101}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "max_tokens"
        slow = asyncio.create_task(http.post(url + "/v1/completions",
                                             json={"prompt": "a", "max_tokens": 1}))
        await asyncio.sleep(0.2)
        async with http.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 1}) as r:
            assert r.status == 503 and "Retry-After" in r.headers
        async with await slow as r:
            assert r.status == 200


async def test_admission_rejects_with_retry_after_and_stage(start_pdlb, http):
    p, d = FakeBehaviour(delay_s=0.6), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        cfg = make_config([pu], [du], pools={"prefill": {"max_inflight_tokens": 20, "max_queue": 0}})
        url, _ = await start_pdlb(cfg)
        first = asyncio.create_task(http.post(url + "/v1/completions",
                                              json={"prompt": "a " * 15, "max_tokens": 1}))
        await asyncio.sleep(0.2)
        async with http.post(url + "/v1/completions", json={"prompt": "a " * 15, "max_tokens": 1}) as r:
            assert r.status == 429
            assert r.headers["X-Pdlb-Saturated-Stage"] == "prefill"
            assert int(r.headers["Retry-After"]) >= 1
            assert (await r.json())["error"]["code"] == "queue_full"
        async with http.post(url + "/v1/completions", json={"prompt": "a " * 40}) as r:
            assert r.status == 413
        async with await first as r:
            assert r.status == 200


async def test_client_api_keys(start_pdlb, http, monkeypatch):
    monkeypatch.setenv("PDLB_API_KEYS", "env-key, other")
    p, d = FakeBehaviour(), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        url, _ = await start_pdlb(make_config([pu], [du], auth={"api_keys": ["file-key"]}))
        body = {"prompt": "x", "max_tokens": 1}
        for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                ({"Authorization": "Bearer file-key"}, 200),
                                ({"Authorization": "Bearer env-key"}, 200)):
            async with http.post(url + "/v1/completions", json=body, headers=headers) as r:
                assert r.status == status
                if status == 401:
                    err = (await r.json())["error"]
                    assert err["type"] == "authentication_error" and "wrong" not in err["message"]
        async with http.get(url + "/health") as r:
            assert r.status == 200  # probes stay open
        assert "authorization" not in d.requests[0]["headers"]


async def test_admin_off_by_default_and_token_protected(start_pdlb, http, tmp_path):
    p, d = FakeBehaviour(), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        url, _ = await start_pdlb(make_config([pu], [du]))
        async with http.post(url + "/admin/reload") as r:
            assert r.status == 404
        cfg = make_config([pu], [du], admin={"enabled": True, "token": "s3cret"})
        url, _ = await start_pdlb(cfg)
        async with http.get(url + "/admin/state") as r:
            assert r.status == 401
        async with http.get(url + "/admin/state", headers={"Authorization": "Bearer s3cret"}) as r:
            assert r.status == 200
            assert (await r.json())["pools"]["decode"]["backends"][0]["url"] == du


def write_config(path: Path, prefill: list[str], decode: list[str]) -> None:
    path.write_text(
        "[pools.prefill]\nbackends = [" + ", ".join(f'"{u}"' for u in prefill) + "]\n"
        "[pools.decode]\nbackends = [" + ", ".join(f'"{u}"' for u in decode) + "]\n"
        "[admin]\nenabled = true\ntoken = \"t\"\n")


async def test_reload_over_http_swaps_backends_without_dropping_streams(start_pdlb, http, tmp_path):
    from lb.config import load_config

    p, d1b, d2b = FakeBehaviour(), FakeBehaviour(chunk_delay_s=0.05), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d1b)) as d1, \
            run_app(make_fake("decode", d2b)) as d2:
        path = tmp_path / "backends.toml"
        write_config(path, [pu], [d1])
        from lb.serve.server import start_site

        runner, url = await start_site(load_config(path), drain_s=1,
                                       reloader=lambda: load_config(path))
        try:
            stream = await http.post(url + "/v1/completions",
                                     json={"prompt": "x", "max_tokens": 20, "stream": True})
            await stream.content.readline()
            write_config(path, [pu], [d2])
            async with http.post(url + "/admin/reload", headers={"Authorization": "Bearer t"}) as r:
                report = await r.json()
            assert report["pools"]["decode"] == {"added": [d2], "removed": [d1], "backends": [d2]}
            async with http.post(url + "/v1/completions", json={"prompt": "y", "max_tokens": 1}) as r:
                assert r.status == 200
            assert len(d2b.requests) == 1
            rest = await stream.read()  # the old stream finished normally
            # one event was read above: 19 more, then [DONE]
            assert rest.count(b"data: ") == 20 and rest.endswith(b"data: [DONE]\n\n")
            stream.release()
            path.write_text("[pools.prefill]\nbackends = []\n")
            async with http.post(url + "/admin/reload", headers={"Authorization": "Bearer t"}) as r:
                assert r.status == 400 and "nothing changed" in (await r.json())["error"]["message"]
        finally:
            await runner.cleanup()


def test_sigterm_drains_inflight_stream_and_sighup_reloads(tmp_path):
    """A real pdlb process: SIGHUP reloads the file; SIGTERM lets a running stream finish."""
    script = tmp_path / "drive.py"
    script.write_text(DRIVER)
    result = subprocess.run([sys.executable, str(script), str(tmp_path), str(REPO)],
                            capture_output=True, text=True, timeout=90, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reloaded-ok stream-complete exit-0" in result.stdout


DRIVER = '''
import asyncio, signal, subprocess, sys, json
from pathlib import Path
import aiohttp
from tests.fake_vllm import FakeBehaviour, make_fake, run_app

async def main(tmp, repo):
    p, d1, d2 = FakeBehaviour(), FakeBehaviour(chunk_delay_s=0.05), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d1)) as u1, \\
            run_app(make_fake("decode", d2)) as u2:
        cfg = Path(tmp) / "b.toml"
        cfg.write_text(f'[pools.prefill]\\nbackends=["{pu}"]\\n[pools.decode]\\nbackends=["{u1}"]\\n'
                       '[server]\\ndrain_timeout_s = 10\\n')
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lb.cli", "serve", "--config", str(cfg), "--port", "0",
            stdout=asyncio.subprocess.PIPE, cwd=repo)
        line = (await proc.stdout.readline()).decode()
        url = line.split()[-1]
        out = []
        async with aiohttp.ClientSession() as http:
            cfg.write_text(f'[pools.prefill]\\nbackends=["{pu}"]\\n[pools.decode]\\nbackends=["{u2}"]\\n'
                           '[server]\\ndrain_timeout_s = 10\\n')
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            async with http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as r:
                assert r.status == 200
            if len(d2.requests) == 1 and not d1.requests:
                out.append("reloaded-ok")
            r = await http.post(url + "/v1/completions",
                                json={"prompt": "x", "max_tokens": 20, "stream": True})
            await r.content.readline()
            proc.send_signal(signal.SIGTERM)
            body = await r.read()
            if body.count(b"data: ") == 20 and body.endswith(b"data: [DONE]\\n\\n"):
                out.append("stream-complete")
            code = await asyncio.wait_for(proc.wait(), 20)
            out.append(f"exit-{code}")
        print(" ".join(out))

asyncio.run(main(sys.argv[1], sys.argv[2]))
'''


async def test_slow_clients_are_cut_off(start_pdlb):
    """A connection that never finishes its request head, or its body, is closed."""
    p, d = FakeBehaviour(), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        cfg = make_config([pu], [du], server={"port": 0, "client_idle_timeout_s": 0.5,
                                              "body_timeout_s": 0.5})
        url, _ = await start_pdlb(cfg)
        host, port = url.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host[len("http://"):], int(port))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by pdlb
        writer.close()
        reader, writer = await asyncio.open_connection(host[len("http://"):], int(port))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        answer = b""
        while b"body_timeout" not in answer:  # the connection lingers: read the answer only
            chunk = await asyncio.wait_for(reader.read(4096), 5)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"Connection: close" in answer
        writer.close()
