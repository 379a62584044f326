"""Fixtures for the real-vLLM end-to-end tests (marker ``vllm``).

* ``vllm_env``: the CPU vLLM virtualenv: ``PDLB_VLLM_ENV`` (a venv folder), or the venv of
  ``PDLB_VLLM_PYTHON``, or ``<repo>/.venv-vllm`` (built by scripts/vllm-cpu-env). Missing:
  the tests skip, saying how to build it; with ``PDLB_REQUIRE_VLLM=1`` (CI) they fail.
* ``tiny_model``: ``<repo>/.cache/tiny-llama``, built by scripts/make_tiny_model.py under
  the vLLM venv's python when missing (~5 s).
* ``vllm_pair``: ONE real prefill + decode pair (NixlConnector, CPU) per test module, on free
  loopback ports, through :class:`lb.tools.launch_vllm.VllmPool`. Its context is
  ``max_model_len`` (32768) tokens, past the tiny model's 2048 positions (``--hf-overrides``),
  so one answer can keep the decode busy for tens of seconds. A module that sets
  ``KV_EVENTS = True`` gets a pair publishing KV-cache events (``launch-vllm --kv-events``,
  free ports); a module's ``VLLM_ARGS`` (a tuple) is added to both servers' ``vllm serve``
  arguments.
* ``pdlb_url``: pdlb itself as a real subprocess (``python -m lb.cli serve``) in front of
  that pair.

Times (environment check, model build, server start-up, whole module) are printed to the
terminal at the end of the session, so CI logs show how long the vLLM part took.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb.tools.launch_vllm import LaunchConfig, VllmLaunchError, VllmPool, backends_toml
from tests.conftest import vllm_env_dir
from tests.vllm.pdlb_process import running_pdlb

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 32768
ENV_STAMP = ".pdlb-vllm-env-complete"

_timings: list[str] = []
"""Lines for the terminal summary; test modules append to it too."""


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _timings:
        terminalreporter.write_sep("-", "real vLLM timings")
        for line in _timings:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def vllm_timings() -> list[str]:
    """Append "what: N s" lines here; they are printed at the end of the session."""
    return _timings


@pytest.fixture(scope="session")
def served_model() -> str:
    """The model name the pair serves (vLLM's --served-model-name)."""
    return MODEL_NAME


@pytest.fixture(scope="session")
def max_model_len() -> int:
    """The pair's --max-model-len: prompt plus answer, in tokens."""
    return MAX_MODEL_LEN


def _unavailable(reason: str) -> None:
    if os.environ.get("PDLB_REQUIRE_VLLM") == "1":
        pytest.fail(f"PDLB_REQUIRE_VLLM=1 but {reason}", pytrace=False)
    pytest.skip(f"{reason} (build it with scripts/vllm-cpu-env, or set PDLB_VLLM_ENV)")


@pytest.fixture(scope="session")
def vllm_env() -> Path:
    """The vLLM venv folder (has bin/vllm and bin/python)."""
    env = vllm_env_dir()
    if not (env / "bin" / "vllm").is_file() or not (env / "bin" / "python").is_file():
        _unavailable(f"no vLLM environment at {env}")
    if not (env / ENV_STAMP).is_file():
        _unavailable(f"the vLLM environment at {env} is incomplete (no {ENV_STAMP})")
    return env


@pytest.fixture(scope="session")
def tiny_model(vllm_env: Path) -> Path:
    """The tiny random Llama directory, built on first use."""
    out = REPO / ".cache" / "tiny-llama"
    started = time.monotonic()
    proc = subprocess.run(
        [str(vllm_env / "bin" / "python"), str(REPO / "scripts" / "make_tiny_model.py"), str(out)],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    if proc.returncode != 0:
        pytest.fail(f"make_tiny_model.py failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    _timings.append(f"tiny model ready in {time.monotonic() - started:.1f} s ({out})")
    return out


@pytest.fixture(scope="module")
def vllm_pair(request: pytest.FixtureRequest, vllm_env: Path, tiny_model: Path,
              tmp_path_factory) -> Iterator[VllmPool]:
    """One real prefill + decode vLLM pair (CPU, NIXL) for the whole module; with KV-cache
    events when the module sets ``KV_EVENTS = True``."""
    kv_events = bool(getattr(request.module, "KV_EVENTS", False))
    module_args = tuple(getattr(request.module, "VLLM_ARGS", ()))
    config = LaunchConfig(
        model=str(tiny_model),
        vllm=(str(vllm_env / "bin" / "vllm"),),
        base_port=0,
        side_channel_port=0,
        served_model_name=MODEL_NAME,
        max_model_len=MAX_MODEL_LEN,
        # The tiny model has 2048 positions; its RoPE extrapolates (to more gibberish), and a
        # long answer lets a test disconnect while the decode is surely still generating.
        extra_vllm_args=("--hf-overrides",
                         json.dumps({"max_position_embeddings": MAX_MODEL_LEN}),
                         *module_args),
        run_dir=tmp_path_factory.mktemp("vllm-run"),
        kv_events=kv_events,
        kv_events_port=0,
        startup_timeout_s=300.0,
        stop_timeout_s=20.0,
    )
    started = time.monotonic()
    pool = VllmPool(config)
    try:
        pool.start()
    except VllmLaunchError as exc:
        pytest.fail(f"the vLLM pair did not start: {exc}", pytrace=False)
    took = ", ".join(f"{name} {s:.1f} s" for name, s in pool.startup_times.items())
    events = ", KV events on" if kv_events else ""
    _timings.append(f"vLLM pair healthy after {time.monotonic() - started:.1f} s ({took}{events})")
    try:
        yield pool
    finally:
        stop_started = time.monotonic()
        pool.stop()
        _timings.append(f"vLLM pair stopped in {time.monotonic() - stop_started:.1f} s; "
                        f"logs in {pool.run_dir / 'logs'}")


@pytest.fixture(scope="module")
def pdlb_url(vllm_pair: VllmPool, tiny_model: Path, tmp_path_factory) -> Iterator[str]:
    """pdlb serving in front of the pair, as a real subprocess on a free port."""
    folder = tmp_path_factory.mktemp("pdlb")
    config = folder / "backends.toml"
    config.write_text(
        backends_toml(vllm_pair.prefill_urls, vllm_pair.decode_urls, lb_port=0)
        + f'\n[tokenizer]\nkind = "hf"\npath = "{tiny_model / "tokenizer.json"}"\n'
        + "\n[health]\ninterval_s = 0.5\n"
    )
    with running_pdlb(config, folder / "pdlb.log", "--log-level", "info") as url:
        yield url
