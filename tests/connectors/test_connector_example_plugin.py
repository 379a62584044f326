"""The example connector plugin, installed with pip like a user would, serves real requests
by name, and its own unit tests (written with lb.connectors.testing) pass."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb.connectors.registry import available
from tests.conftest import make_config
from tests.connectors.kvpd import emulators, legs
from tests.policies.test_example_plugin import _offline_build_possible

pytestmark = pytest.mark.slow  # a pip build (~3 s) and real servers

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pdlb-connector-example"


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """pip-install the example (no deps) into a private target dir, as
    tests/policies/test_example_plugin.py does for the policy example."""
    work = tmp_path_factory.mktemp("connector-example")
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
    monkeypatch.syspath_prepend(str(example_site))
    try:
        yield example_site
    finally:
        sys.modules.pop("pdlb_connector_example", None)


def test_entry_point_is_found_and_its_unit_tests_pass(installed: Path):
    """After pip install, `tagged` is an available connector, and the example's own tests
    pass."""
    assert available()["tagged"] == "pdlb_connector_example:Tagged"
    spec = importlib.util.spec_from_file_location("connector_example_tests",
                                                  EXAMPLE / "tests" / "test_tagged.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ran = [name for name in dir(module) if name.startswith("test_")]
    for name in ran:
        getattr(module, name)()
    assert len(ran) >= 3


async def test_the_plugin_sets_headers_on_both_legs(installed, start_pdlb, http):
    """Selected by name, its option read, its per-leg headers sent through a real pdlb."""
    async with emulators("nixl", 1, 1) as ((p,), (d,)):
        url, _ = await start_pdlb(make_config([p.url], [d.url], kv_transfer={
            "connector": "tagged", "tag": "blue"}))
        async with http.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as r:
            assert r.status == 200
        assert legs(p)[0]["headers"]["x-tag"] == legs(d)[0]["headers"]["x-tag"] == "blue"
