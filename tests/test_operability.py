"""Operating pdlb: the probes, the version, build and process metrics."""

from __future__ import annotations

import logging
import subprocess
import sys

import aiohttp

from lb.metrics import pdlb_version
from lb.serve.app import DRAINING
from tests.conftest import make_config
from tests.fake_vllm import FakeBehaviour, make_fake, run_app
from tests.test_workers import REPO


async def _get(url: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json()


async def test_probes_live_and_ready(start_pdlb) -> None:
    """/health/live is 200 always; /health/ready is 200 with usable backends and 503 with a
    reason when a pool has none or when pdlb is draining; neither needs an API key."""
    p, d = FakeBehaviour(), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        url, app = await start_pdlb(make_config([pu], [du], auth={"api_keys": ["k"]}))
        assert await _get(url + "/health/live") == (200, {"status": "live"})
        status, body = await _get(url + "/health/ready")
        assert status == 200 and body["status"] == "ready"
        app[DRAINING].set()
        status, body = await _get(url + "/health/ready")
        assert status == 503 and "draining" in str(body["reason"])
        assert (await _get(url + "/health/live"))[0] == 200
    down_url, _ = await start_pdlb(make_config(
        ["http://127.0.0.1:9"], ["http://127.0.0.1:9"],
        health={"interval_s": 0.2, "timeout_s": 0.5, "failures_to_eject": 1}))
    status, body = await _get(down_url + "/health/ready")
    assert status == 503 and "no usable backend" in str(body["reason"])
    assert (await _get(down_url + "/health/live"))[0] == 200
    assert (await _get(down_url + "/health"))[0] == 503  # today's meaning


async def test_build_and_process_metrics(start_pdlb) -> None:
    """/metrics carries pdlb_build_info{version,python} 1 and the process_* series."""
    url, _ = await start_pdlb(make_config(["http://127.0.0.1:9"], ["http://127.0.0.1:9"]))
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    assert f'version="{pdlb_version()}"' in text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith(("process_", "pdlb_build_info"))}
    assert values[next(k for k in values if k.startswith("pdlb_build_info"))] == 1.0
    assert values["process_cpu_seconds_total"] > 0
    assert values["process_resident_memory_bytes"] > 1e6
    assert values["process_open_fds"] >= 3
    assert values["process_start_time_seconds"] > 1.6e9


def test_version_flag() -> None:
    """``pdlb --version`` prints the package metadata's version and exits 0."""
    out = subprocess.run([sys.executable, "-m", "lb.cli", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout.strip() == f"pdlb {pdlb_version()}"


def test_health_transitions_log_one_plain_line_each(caplog) -> None:
    """Ejection and restoration each write one line naming the pool and the URL; checks
    that change nothing write nothing."""
    from lb.backends.health import HealthChecker
    from lb.backends.pool import Backend
    from lb.config import HealthConfig

    caplog.set_level(logging.INFO, logger="pdlb.health")
    backend = Backend("http://10.0.0.5:8100", 0, "decode", None)
    checker = HealthChecker([backend], upstream=None, config=HealthConfig())  # type: ignore[arg-type]
    for _ in range(4):
        checker.report_failure(backend)
    for _ in range(3):
        checker.report_success(backend)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "pdlb.health"]
    assert lines == [
        ("WARNING", "decode backend http://10.0.0.5:8100 taken out of rotation after 2 failures"
                    " in a row (health checks or requests); checked again every 2 s"),
        ("INFO", "decode backend http://10.0.0.5:8100 is back in rotation after 1 good"
                 " check(s)"),
    ]


def test_reload_is_one_plain_info_line(caplog, tmp_path) -> None:
    """A successful reload logs at INFO in words, not a dict at WARNING."""
    from lb.admission import Admission
    from lb.backends.pool import Pool
    from lb.metrics import Metrics
    from lb.serve.admin import apply_reload
    from policies.registry import build_policy

    caplog.set_level(logging.INFO, logger="pdlb.admin")
    old = make_config(["http://10.0.0.1:1"], ["http://10.0.0.2:1"])
    new = make_config(["http://10.0.0.1:1", "http://10.0.0.3:1"], ["http://10.0.0.2:1"],
                      server={"port": 0, "body_timeout_s": 5})
    metrics = Metrics()
    pools = {name: Pool(pc, build_policy(pc.policy, pc.policy_options, pool=name), metrics)
             for name, pc in old.pools.items()}
    apply_reload(old, new, pools, [(Admission(old.pools, metrics), {"prefill": "prefill", "decode": "decode"})], lambda: None)
    (record,) = [r for r in caplog.records if r.name == "pdlb.admin"]
    assert record.levelname == "INFO"
    assert record.getMessage() == (
        "reloaded <test>: prefill pool added http://10.0.0.3:1 (2 backends); decode pool"
        " unchanged (1 backend); changed but not applied until a restart: [server]")


async def test_workers_metrics_in_one_scrape() -> None:
    """Under ``--workers 2`` one /metrics scrape holds both workers' series, labelled
    ``worker``; their request counters add up to the requests served."""
    import asyncio

    p, d = FakeBehaviour(), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lb.cli", "serve", "--prefill", pu, "--decode", du,
            "--port", "0", "--workers", "2", "--log-level", "warning",
            stdout=asyncio.subprocess.PIPE, cwd=REPO)
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            url = line.split()[3]
            async with aiohttp.ClientSession() as http:
                for _ in range(10):
                    async with http.post(url + "/v1/completions",
                                         json={"prompt": "x", "max_tokens": 1},
                                         headers={"Connection": "close"}) as r:
                        assert r.status == 200
                async with http.get(url + "/metrics") as r:
                    text = await r.text()
            builds = [x for x in text.splitlines() if x.startswith("pdlb_build_info{")]
            assert len(builds) == 2
            assert any('worker="0"' in x for x in builds)
            assert any('worker="1"' in x for x in builds)
            served = sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines()
                         if x.startswith("pdlb_requests_total{") and 'status="200"' in x)
            assert served == 10
            proc.terminate()
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_admin_on_its_own_port_starts_and_stops(start_pdlb) -> None:
    """``[admin] port`` set: pdlb starts (the admin runner's cleanup is registered before
    the app's signals freeze) and the main listener still answers its probes."""
    url, _ = await start_pdlb(make_config(["http://127.0.0.1:9"], ["http://127.0.0.1:19"],
                                          admin={"enabled": True, "token": "t", "port": 0}))
    assert (await _get(url + "/health/live"))[0] == 200
