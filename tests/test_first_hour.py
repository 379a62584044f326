"""The first hour with pdlb: flags checked like the file, a busy port in one line, the
emulator's own port, typed 405s, and a backend listed in both pools."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import aiohttp
import pytest

from tests.conftest import make_config

PDLB = [sys.executable, "-m", "lb.cli"]
DEAD = "http://127.0.0.1:9"
DEAD2 = "http://127.0.0.1:19"


def _pdlb(*argv: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PDLB, *argv], capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_bad_port_flag_is_one_line_and_exit_2(port) -> None:
    """``--port`` out of range is refused like the file's ``[server] port``: one line on
    stderr naming the flag, exit 2, nothing bound."""
    out = _pdlb("serve", "--prefill", DEAD, "--decode", DEAD2, "--port", port)
    assert out.returncode == 2
    bound = ">= 0" if port.startswith("-") else "<= 65535"
    assert out.stderr.splitlines() == [f"pdlb: config error: --port = {port}: must be {bound}"]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_busy_port_is_one_line_and_exit_2(busy_port, workers) -> None:
    """A port in use: one line, exit 2, no traceback and no asyncio noise (also with
    --workers, whose parent reserves the port)."""
    out = _pdlb("serve", "--prefill", DEAD, "--decode", DEAD2, "--port", str(busy_port),
                "--log-level", "warning", "--workers", workers)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"pdlb: cannot listen on 127.0.0.1:{busy_port}: the address is already in use"
        " (another server on that port?)"]


def test_emulate_on_a_busy_port_is_one_line_and_exit_2(busy_port) -> None:
    """``pdlb emulate`` on a port in use: the same one line, exit 2, no traceback."""
    out = _pdlb("emulate", "--port", str(busy_port))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"pdlb emulate: cannot listen on 127.0.0.1:{busy_port}: the address is already in"
        " use (another server on that port?)"]


def test_emulate_help_names_itself_and_another_port() -> None:
    """``pdlb emulate --help`` says ``pdlb emulate`` and a default port other than 8000."""
    out = _pdlb("emulate", "--help")
    assert out.returncode == 0
    assert out.stdout.startswith("usage: pdlb emulate")
    from emulator.cli import DEFAULT_PORT, build_parser

    assert DEFAULT_PORT != 8000 and build_parser().parse_args([]).port == DEFAULT_PORT


def test_same_url_in_both_pools_is_warned_at_start_up() -> None:
    """A backend listed as prefill and decode gets a warning naming it at start-up."""
    proc = subprocess.Popen([*PDLB, "serve", "--prefill", DEAD, "--decode", DEAD, "--port",
                             "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("pdlb listening on ")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    warnings = [line for line in err.splitlines() if "in both the prefill and the decode" in line]
    assert len(warnings) == 1 and DEAD in warnings[0] and "WARNING" in warnings[0]
    assert proc.returncode == 0


async def test_405_is_an_invalid_request_error_with_allow(start_pdlb) -> None:
    """A wrong method on a known path is a 405 typed ``invalid_request_error``, with Allow."""
    url, _ = await start_pdlb(make_config([DEAD], [DEAD]))
    async with aiohttp.ClientSession() as s, s.get(url + "/v1/completions") as r:
        assert r.status == 405
        assert "POST" in r.headers["Allow"]
        error = (await r.json())["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "method_not_allowed"


def test_help_is_plain_and_serve_help_has_examples() -> None:
    """``pdlb --help`` has no RST markup or developer notes; ``pdlb serve --help`` shows
    examples and the probes."""
    top = _pdlb("--help")
    assert top.returncode == 0 and "pdlb serve --config backends.toml" in top.stdout
    assert "``" not in top.stdout and "lazily" not in top.stdout
    serve = _pdlb("serve", "--help")
    assert serve.returncode == 0
    assert "examples:" in serve.stdout and "/health/ready" in serve.stdout
