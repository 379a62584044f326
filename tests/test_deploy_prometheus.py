"""deploy/: the Grafana dashboard and the Prometheus alert rules, checked against a real
Prometheus server (the `prometheus` and `promtool` binaries, e.g. Debian's `prometheus`
package; scripts/test installs it when it can).

* ``promtool check rules`` on deploy/prometheus/alerts.yml, and ``promtool test rules`` on
  alerts_test.yml, whose groups must make every alert fire on a simulated outage and stay
  silent on healthy series.
* The dashboard's JSON model: Grafana's shape (rows, grid, unique ids, ``${datasource}``,
  units, the ``job``/``instance`` filter on every query).
* Live: two emulators publishing KV events (1 prefill, 1 decode) behind a pdlb with
  ``[kv_events]``, kv_aware and a small decode budget; a real Prometheus scrapes that pdlb
  every second (alerts.yml loaded as its rule file) while a short bounded load runs — plain
  requests, requests rejected by admission, failing and dropping backends, a client that
  leaves. Then every PromQL expression of the dashboard (each panel target, Grafana's
  ``$__rate_interval``/``$job``/``$instance`` substituted as Grafana would) and of
  alerts.yml is sent to Prometheus' HTTP API and must parse and return data. An alert's
  expression is a condition (``... > 0.05``), which is empty while pdlb is healthy, so for
  alerts the full expression must parse, and its left side (the expression without the
  trailing comparison with a number) must return data: proof that every series and label
  it uses exists.

Skipped when prometheus/promtool are missing, unless PDLB_REQUIRE_PROMETHEUS=1 (CI).
Grafana itself is not run: the dashboard's queries are checked, not its rendering.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from emulator import EmulatorConfig, EmulatorServer
from lb.serve.app import KV_EVENTS, POOLS
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "pdlb.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
MODEL = "emulated-model"
BS = 16
SCRAPE_S = 1.0

# An alert expression `<left side> <op> <number>`: the comparison at its very end.
THRESHOLD = re.compile(r"^(?P<left>.*?)\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?"
                       r"-?[0-9][0-9.e+-]*\s*$", re.S)


def _tools() -> tuple[str, str]:
    """Paths of prometheus and promtool, or skip (fail under PDLB_REQUIRE_PROMETHEUS=1)."""
    found = {name: shutil.which(name) for name in ("prometheus", "promtool")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        why = (f"{' and '.join(missing)} not installed (Debian/Ubuntu: apt-get install"
               " prometheus; scripts/test installs it when run as root)")
        if os.environ.get("PDLB_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"{why}, and PDLB_REQUIRE_PROMETHEUS=1")
        pytest.skip(why)
    return str(found["prometheus"]), str(found["promtool"])


def _promtool(*args: str) -> str:
    _, promtool = _tools()
    run = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows hold their panels


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title / refId, expr) of every target in the dashboard."""
    return [(f"{p['title']} / {t['refId']}", t["expr"])
            for p in _panels(_dashboard()["panels"]) for t in p.get("targets", [])]


# -- static checks -------------------------------------------------------------------------

def test_promtool_checks_the_rules() -> None:
    out = _promtool("check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(_rules())} rules found" in out, out


def test_promtool_unit_tests_make_every_alert_fire() -> None:
    """alerts_test.yml passes, and it covers each alert both ways: an eval that expects
    it to fire (outage) and one that expects silence (healthy series)."""
    out = _promtool("test", "rules", str(ALERTS_TEST))
    assert "SUCCESS" in out, out
    fires: set[str] = set()
    silent: set[str] = set()
    for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {rule["alert"] for rule in _rules()}
    assert names - fires == set(), "alerts never made to fire"
    assert names - silent == set(), "alerts never checked silent on healthy series"


def test_alert_rules_are_actionable() -> None:
    for rule in _rules():
        assert rule.get("for"), rule["alert"]
        assert rule["labels"].get("severity") in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 80
        assert THRESHOLD.match(rule["expr"].strip()), f"{rule['alert']}: no trailing threshold"


def test_dashboard_is_a_grafana_model() -> None:
    """Rows and panels on Grafana's 24-column grid, unique ids, every query through the
    ``${datasource}`` variable and filtered by ``$job`` and ``$instance``, units set."""
    d = _dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    panels = list(_panels(d["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    rows = [p["title"] for p in panels if p["type"] == "row"]
    for wanted in ("Latency", "Admission", "Pools and backends", "Errors and retries",
                   "KV events"):
        assert wanted in rows
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        if p["type"] in ("timeseries", "stat"):
            assert p["fieldConfig"]["defaults"].get("unit"), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert 'job=~"$job"' in t["expr"] and 'instance=~"$instance"' in t["expr"], \
                (p["title"], t["expr"])


# -- live: pdlb scraped by a real Prometheus ------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _emulator(role: str) -> EmulatorServer:
    return EmulatorServer(EmulatorConfig(
        role=role, time_scale=50.0, seed=3, block_size=BS,
        kv_events_endpoint=f"tcp://*:{_free_port()}"))


@contextlib.asynccontextmanager
async def _prometheus(tmp: Path, target: str) -> AsyncIterator[str]:
    """A real Prometheus on a free loopback port scraping ``target`` every second, with
    alerts.yml as its rule file; its base URL. Killed on exit."""
    prometheus, _ = _tools()
    port = _free_port()
    config = tmp / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": f"{SCRAPE_S:g}s", "evaluation_interval": "1s",
                   "scrape_timeout": "900ms"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "pdlb",
                            "static_configs": [{"targets": [target]}]}],
    }))
    log = tmp / "prometheus.log"
    with log.open("w") as out:
        proc = await asyncio.create_subprocess_exec(
            prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(150):  # 15 s
                if proc.returncode is not None:
                    break
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url + "/-/ready") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("prometheus not ready within 15 s")
        assert proc.returncode is None, f"prometheus exited:\n{log.read_text()}"
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _query(http: aiohttp.ClientSession, prom: str, expr: str) -> list[dict[str, Any]]:
    async with http.get(prom + "/api/v1/query", params={"query": expr}) as r:
        body = await r.json()
    assert r.status == 200 and body["status"] == "success", f"{expr}\n  -> {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def _faults(http: aiohttp.ClientSession, emulator: EmulatorServer, **knobs: Any) -> None:
    path = "/_emulator/reset" if not knobs else "/_emulator/faults"
    async with http.post(emulator.url + path, json=knobs or None) as r:
        assert r.status == 200, await r.text()


async def _complete(http: aiohttp.ClientSession, url: str, prompt: list[int] | str,
                    max_tokens: int = 4, stream: bool = False, chat: bool = False) -> int:
    """One request to pdlb; its HTTP status (streams read to the end)."""
    if chat:
        path, body = "/v1/chat/completions", {
            "messages": [{"role": "user", "content": prompt}]}
    else:
        path, body = "/v1/completions", {"prompt": prompt}
    body.update(model=MODEL, max_tokens=max_tokens, stream=stream)
    async with asyncio.timeout(20), http.post(url + path, json=body) as r:
        await r.read()
        return r.status


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 9000 + 10 for i in range(n)]


async def _until_healthy(app: Any) -> None:
    for _ in range(100):  # the health loop restores ejected backends every 0.2 s
        if all(b.healthy for pool in app[POOLS].values() for b in pool.backends):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("backends not back in rotation")


async def _scrapes_after(http: aiohttp.ClientSession, prom: str, after: float, n: int) -> None:
    """Wait until Prometheus holds ``n`` scrapes of pdlb taken after ``after`` (Unix time).
    Its first scrape comes a few seconds after start (target discovery is throttled)."""
    for _ in range(150):  # 15 s
        result = await _query(http, prom, 'pdlb_build_info{job="pdlb"}[1m]')
        if result and sum(float(t) > after for t, _ in result[0]["values"]) >= n:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"prometheus did not scrape pdlb {n} times")


async def _load(http: aiohttp.ClientSession, url: str, app: Any, prom: str,
                prefill: EmulatorServer, decode: EmulatorServer) -> dict[str, int]:
    """A short bounded load that makes every series of the dashboard and the alerts exist;
    the statuses seen, counted."""
    statuses: dict[str, int] = {}

    def seen(*codes: int) -> None:
        for code in codes:
            statuses[str(code)] = statuses.get(str(code), 0) + 1

    events = app[KV_EVENTS]
    # 1. both backends' KV-event streams live (ZMQ's slow joiner loses what comes earlier)
    for i in range(150):
        seen(await _complete(http, url, [7, 100 + i] * BS, max_tokens=2))
        if all(events.health(pool, e.url)["state"] == "live"
               for pool, e in (("prefill", prefill), ("decode", decode))):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("KV events never live")
    # the rest after Prometheus' first scrape, so that its rates and quantiles see it
    await _scrapes_after(http, prom, 0, 1)
    # 2. ordinary traffic: completions and chat, streamed or not, a shared long prefix
    shared = _prompt(1, 12 * BS)
    for i in range(4):
        seen(*await asyncio.gather(
            _complete(http, url, shared + [50 + i] * 5, stream=i % 2 == 0),
            _complete(http, url, _prompt(10 + i, 3 * BS), max_tokens=8, stream=True),
            _complete(http, url, f"hello number {i}", chat=True, stream=i % 2 == 1)))
    # 3. admission: one request larger than the decode budget (413), then a burst of
    # requests each taking most of it: one admitted, max_queue (2) wait for it, the rest 429
    seen(await _complete(http, url, _prompt(2, 1900), max_tokens=200))
    seen(*await asyncio.gather(*(_complete(http, url, _prompt(20 + i, 900), max_tokens=600)
                                 for i in range(8))))
    # 4. a failing decode (retried, then its 500 passed through; ejected, so 503 until
    # the health loop restores it), then a failing prefill (retried, then 502)
    for emulator in (decode, prefill):
        await _faults(http, emulator, fail_rate=1.0)
        for i in range(3):
            seen(await _complete(http, url, _prompt(30 + i, 2 * BS)))
        await _faults(http, emulator)
        await _until_healthy(app)
    # 5. a decode dropping its streams after two chunks: SSE error events
    await _faults(http, decode, drop_after_chunks=2)
    for i in range(3):
        seen(await _complete(http, url, _prompt(40 + i, 2 * BS), max_tokens=10, stream=True))
    await _faults(http, decode)
    await _until_healthy(app)
    # 6. a client that leaves while the decode has not answered yet
    await _faults(http, decode, extra_latency_ms=1000)
    task = asyncio.create_task(_complete(http, url, _prompt(50, 2 * BS), stream=True))
    await asyncio.sleep(0.3)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await _faults(http, decode)
    seen(await _complete(http, url, _prompt(51, 2 * BS)))
    return statuses


@pytest.mark.timeout(120)
async def test_every_dashboard_and_alert_expression_returns_data(
        start_pdlb: Any, tmp_path: Path) -> None:
    _tools()
    started = time.monotonic()
    async with _emulator("prefill") as prefill, _emulator("decode") as decode:
        config = make_config(
            [prefill.url], [decode.url], kv_events={"enabled": True},
            tokenizer={"kind": "emulator"},
            pools={"prefill": {"policy": "kv_aware"},
                   "decode": {"max_inflight_tokens": 2000, "max_queue": 2,
                              "queue_timeout_s": 5}})
        url, app = await start_pdlb(config)
        async with _prometheus(tmp_path, url.split("//", 1)[1]) as prom, \
                aiohttp.ClientSession() as http:
            statuses = await _load(http, url, app, prom, prefill, decode)
            for code in ("200", "413", "429", "502"):
                assert statuses.get(code), f"the load produced no {code}: {statuses}"
            # a few scrapes after the load: each counter born late has two samples
            await _scrapes_after(http, prom, time.time(), 2)
            assert [r["value"][1] for r in await _query(http, prom, 'up{job="pdlb"}')] == ["1"]
            await _check_dashboard(http, prom, window_s=time.monotonic() - started + 5)
            await _check_alerts(http, prom)
    assert time.monotonic() - started < 60


async def _check_dashboard(http: aiohttp.ClientSession, prom: str, window_s: float) -> None:
    """Resolve the template variables through Prometheus (as Grafana's label_values()
    does), substitute them and the interval macros, and query every target."""
    d = _dashboard()
    values: dict[str, str] = {}
    for var in d["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["definition"]
        for name, value in values.items():
            query = query.replace(f"${name}", value)
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m, query
        async with http.get(f"{prom}/api/v1/label/{m.group(2)}/values",
                            params={"match[]": m.group(1)}) as r:
            found = (await r.json())["data"]
        assert found, f"variable {var['name']}: {query} has no values"
        # regex-escaped, then escaped again inside a PromQL string, as Grafana does
        values[var["name"]] = "|".join(re.escape(v).replace("\\", "\\\\") for v in found)
    # Grafana: $__rate_interval = max($__interval + scrape interval, 4 x scrape interval);
    # here one window that spans the whole run, so each query sees all of the load
    window = f"{math.ceil(window_s)}s"
    problems = []
    queries = _dashboard_queries()
    for where, expr in queries:
        for macro in ("$__rate_interval", "$__interval", "$__range"):
            expr = expr.replace(macro, window)
        for name, value in values.items():
            expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
        assert "$" not in expr, f"{where}: unresolved variable in {expr}"
        result = await _query(http, prom, expr)
        if not result:
            problems.append(f"{where}: no data for {expr}")
        elif all(math.isnan(float(r["value"][1])) for r in result):
            problems.append(f"{where}: only NaN for {expr}")
    assert not problems, "\n".join(problems)
    assert len(queries) >= 40


async def _check_alerts(http: aiohttp.ClientSession, prom: str) -> None:
    """Every alert expression parses; its left side (without the trailing threshold)
    returns data; Prometheus loaded every rule and evaluates it without error."""
    problems = []
    rules = _rules()
    for rule in rules:
        expr = rule["expr"].strip()
        await _query(http, prom, expr)  # parses and evaluates (empty while healthy)
        m = THRESHOLD.match(expr)
        assert m, expr
        if not await _query(http, prom, m.group("left")):
            problems.append(f"{rule['alert']}: no data for {m.group('left')}")
    assert not problems, "\n".join(problems)
    async with http.get(prom + "/api/v1/rules") as r:
        loaded = [rule for group in (await r.json())["data"]["groups"]
                  for rule in group["rules"]]
    assert sorted(r["name"] for r in loaded) == sorted(r["alert"] for r in rules)
    for rule in loaded:
        assert rule["health"] in ("ok", "unknown") and not rule.get("lastError"), rule
