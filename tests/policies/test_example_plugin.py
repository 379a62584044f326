"""The example plugin, installed with pip like a user would, routes real requests by name."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from emulator import EmulatorConfig, EmulatorServer
from lb.serve.app import POOLS
from policies.registry import available, build_policy
from tests.conftest import make_config

pytestmark = pytest.mark.slow  # a pip build (~3 s) and real servers

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "pdlb-policy-example"


def _offline_build_possible() -> bool:
    """setuptools builds a wheel without the `wheel` package from 70.1 on; older ones need it.
    With either, pip can build from this environment with no download."""
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        from setuptools import __version__
    except ImportError:
        return False
    major, minor = (int(x) for x in __version__.split(".")[:2])
    return (major, minor) >= (70, 1)


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """pip-install the example (no deps: pdlb is already here) into a private target dir;
    the shared environment is not touched and the source tree gets no build files. Built
    offline when this environment can build wheels; otherwise pip fetches setuptools from
    the package index into an isolated build environment (as CI's fresh venv does)."""
    work = tmp_path_factory.mktemp("example")
    source = work / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                   "__pycache__"))
    site = work / "site"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
               "--disable-pip-version-check", "--target", str(site), str(source)]
    if _offline_build_possible():
        command.insert(4, "--no-build-isolation")
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    yield site


@pytest.fixture
def installed(example_site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The installed example on sys.path for one test (its module unloaded afterwards)."""
    monkeypatch.syspath_prepend(str(example_site))
    try:
        yield example_site
    finally:
        sys.modules.pop("pdlb_policy_example", None)


def test_entry_point_is_found_and_its_unit_tests_pass(installed: Path):
    """After pip install, `least_kv_usage` is an available policy from the installed copy,
    and the example's own unit tests (written with policies.testing) pass."""
    assert available()["least_kv_usage"] == "pdlb_policy_example:LeastKVUsage"
    policy = build_policy("least_kv_usage", {"kv_capacity_tokens": 1000}, pool="decode")
    assert Path(sys.modules[type(policy).__module__].__file__ or "").is_relative_to(installed)
    spec = importlib.util.spec_from_file_location(
        "example_tests", EXAMPLE / "tests" / "test_least_kv_usage.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ran = [name for name in dir(module) if name.startswith("test_")]
    for name in ran:
        getattr(module, name)()
    assert len(ran) >= 3


@pytest.fixture
async def emulators() -> AsyncIterator[tuple[list[str], list[str]]]:
    servers = [EmulatorServer(EmulatorConfig(role=role, time_scale=50.0))
               for role in ("prefill", "prefill", "decode", "decode")]
    for server in servers:
        await server.start()
    try:
        yield [s.url for s in servers[:2]], [s.url for s in servers[2:]]
    finally:
        for server in servers:
            await server.stop()


async def test_routes_real_requests_through_the_plugin_by_name(installed, emulators,
                                                               start_pdlb):
    """pdlb started with `policy = "least_kv_usage"` for decode builds the plugin, feeds it
    scraped load, and serves completions through it."""
    prefill, decode = emulators
    config = make_config(prefill, decode, scrape={"interval_s": 0.05}, pools={
        "decode": {"policy": "least_kv_usage",
                   "policy_options": {"kv_capacity_tokens": 50_000}}})
    url, app = await start_pdlb(config)
    pool = app[POOLS]["decode"]
    assert type(pool.policy).__name__ == "LeastKVUsage"
    legs: list[str] = []
    plugin_pick = pool.policy.pick
    pool.policy.pick = lambda request, candidates: legs.append(request.leg) or plugin_pick(
        request, candidates)
    async with aiohttp.ClientSession() as http:
        for i in range(6):
            body = {"model": "emulated-model", "prompt": f"Request {i}: " + "tell me " * 50,
                    "max_tokens": 8, "stream": i % 2 == 1}
            async with http.post(url + "/v1/completions", json=body) as resp:
                text = await resp.text()
                assert resp.status == 200, text
                assert "[DONE]" in text if body["stream"] else '"choices"' in text
    assert legs == ["decode"] * 6
    assert any(b.load is not None for b in pool.backends), "no /metrics sample reached it"
