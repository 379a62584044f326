"""The access log (lb/accesslog.py): one ``pdlb.access`` line per finished completion
request, on both fronts, for answers, refusals and clients that left."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from lb.serve.app import METRICS, PROXY
from tests.conftest import make_config
from tests.fake_vllm import FakeBehaviour, make_fake, run_app
from tests.rawhttp import BODY, STREAM_BODY, post

FRONTS = pytest.mark.parametrize("fast_front", [True, False], ids=["front", "aiohttp"])


@pytest.fixture
async def pair() -> AsyncIterator[tuple[FakeBehaviour, FakeBehaviour, str, str]]:
    p, d = FakeBehaviour(), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        yield p, d, pu, du


async def eventually(check: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Wait until ``check()`` holds (a handler may finish after its client left)."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pdlb.access"]


async def _one_line(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    """The only access line, once written (a handler may finish after the client left)."""
    await eventually(lambda: bool(_lines(caplog)))
    lines = _lines(caplog)
    assert len(lines) == 1, lines
    parsed: dict[str, Any] = orjson.loads(lines[0])
    return parsed


@FRONTS
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_one_line_per_request(pair, start_pdlb, connect, caplog, fast_front,
                                    stream) -> None:
    """An answered request writes exactly one JSON line with its id, client, endpoint,
    model, status, tokens, backends and stage times — and nothing of the prompt."""
    caplog.set_level(logging.INFO, logger="pdlb.access")
    p, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du], server={"port": 0, "fast_front":
                                                             fast_front},
                                          log={"format": "json"}))
    c = await connect(url)
    body = (STREAM_BODY.replace(b'"stream":true', b'"stream":true,"stream_options":'
                                b'{"include_usage":true}') if stream
            else BODY)
    body = body.replace(b"hello", b"secret prompt")
    await c.send(post(body=body))
    status, headers, _ = await c.response()
    assert status == 200
    line = await _one_line(caplog)
    assert line["request_id"] == headers["x-request-id"]
    assert line["client"] == "127.0.0.1"
    assert line["endpoint"] == "completions" and line["model"] == "fake"
    assert line["status"] == 200 and line["reason"] is None
    assert line["prompt_tokens"] == 7 and line["cached_tokens"] == 3
    assert line["output_tokens"] == 3  # max_tokens
    assert line["prefill"] == pu and line["decode"] == du
    for stage in ("queue_ms", "prefill_ms", "handoff_ms", "decode_ms", "ttft_ms", "total_ms"):
        assert isinstance(line[stage], float) and line[stage] >= 0, stage
    assert line["total_ms"] >= line["ttft_ms"]
    assert "secret" not in _lines(caplog)[0]


@FRONTS
async def test_refused_requests_are_logged(pair, start_pdlb, connect, caplog,
                                           fast_front) -> None:
    """A 401 is one line with its reason and without the key that was sent."""
    caplog.set_level(logging.INFO, logger="pdlb.access")
    _, _, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du], server={"port": 0, "fast_front":
                                                             fast_front},
                                          auth={"api_keys": ["right-key"]},
                                          log={"format": "json"}))
    c = await connect(url)
    await c.send(post(extra="Authorization: Bearer wrong-key-value\r\n"))
    assert (await c.response())[0] == 401
    line = await _one_line(caplog)
    assert line["status"] == 401 and line["reason"] == "invalid_api_key"
    assert "wrong-key-value" not in _lines(caplog)[0]
    assert "right-key" not in _lines(caplog)[0]


@FRONTS
async def test_admission_429_and_client_disconnect(pair, start_pdlb, connect, caplog,
                                                   fast_front) -> None:
    """A request shed by admission (429) logs its reason; a client that leaves while its
    request waits on the prefill logs 499 ``client_disconnect``."""
    caplog.set_level(logging.INFO, logger="pdlb.access")
    p, _, pu, du = pair
    p.delay_s = 30.0  # the first request holds the decode budget until its client leaves
    url, app = await start_pdlb(make_config(
        [pu], [du], server={"port": 0, "fast_front": fast_front}, log={"format": "json"},
        pools={"decode": {"max_inflight_tokens": 10, "max_queue": 0}}))
    body = orjson.dumps({"model": "fake", "prompt": "hello", "max_tokens": 8})
    first = await connect(url)
    await first.send(post(body=body))

    await eventually(lambda: bool(p.requests))
    assert app[PROXY].admission.admitted_tokens("decode") > 0
    second = await connect(url)
    await second.send(post(body=body))
    assert (await second.response())[0] == 429
    line = await _one_line(caplog)
    assert line["status"] == 429 and line["reason"] == "queue_full"
    caplog.clear()
    first.reset()
    line = await _one_line(caplog)
    assert line["status"] == 499 and line["reason"] == "client_disconnect"
    assert line["prefill"] == pu and line["decode"] is None


async def test_text_format_and_off(pair, start_pdlb, connect, caplog) -> None:
    """``format = "text"`` writes key=value pairs; ``access = false`` writes nothing."""
    caplog.set_level(logging.INFO, logger="pdlb.access")
    _, _, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du]))
    c = await connect(url)
    await c.send(post())
    status, headers, _ = await c.response()
    assert status == 200
    await eventually(lambda: bool(_lines(caplog)))
    (text,) = _lines(caplog)
    assert text.startswith(f"request_id={headers['x-request-id']} client=127.0.0.1 ")
    assert " status=200 " in text and " decode=" + du in text
    caplog.clear()
    url, _ = await start_pdlb(make_config([pu], [du], log={"access": False}))
    c = await connect(url)
    await c.send(post())
    assert (await c.response())[0] == 200
    assert _lines(caplog) == []


@FRONTS
async def test_body_timeout_is_logged(pair, start_pdlb, connect, caplog, fast_front) -> None:
    """A body that never arrives (408) is one line too, on the front that answers it
    before the guard's serve and on aiohttp's."""
    caplog.set_level(logging.INFO, logger="pdlb.access")
    _, _, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du], server={
        "port": 0, "fast_front": fast_front, "body_timeout_s": 0.3}, log={"format": "json"}))
    c = await connect(url)
    await c.send(post()[:-5])
    assert (await c.response())[0] == 408
    line = await _one_line(caplog)
    assert line["status"] == 408 and line["reason"] == "body_timeout"
    assert line["endpoint"] == "completions" and line["total_ms"] > 0


@FRONTS
async def test_client_leaving_after_done_is_a_200(pair, start_pdlb, connect, caplog,
                                                  fast_front) -> None:
    """A client that read ``[DONE]`` and closed while pdlb still waited for the decode's
    last chunk got its whole stream: counted and logged 200, not 499 (issue 16)."""
    caplog.set_level(logging.INFO, logger="pdlb.access")
    _, d, pu, du = pair
    d.end_delay_s = 30.0
    url, app = await start_pdlb(make_config([pu], [du], server={"port": 0, "fast_front":
                                                             fast_front},
                                          log={"format": "json"}))
    c = await connect(url)
    await c.send(post(body=STREAM_BODY))
    seen = b""
    while b"[DONE]" not in seen:
        seen += await c.reader.read(65536)
    c.reset()
    line = await _one_line(caplog)
    assert line["status"] == 200 and line["reason"] is None
    text = app[METRICS].render().decode()
    assert 'pdlb_requests_total{endpoint="completions",status="200"} 1.0' in text
    assert 'phase="before_response"' not in text
