"""The guard (lb/serve/guard.py) and the route table (lb/serve/routes.py), on both fronts.

Each behaviour is checked with ``fast_front`` true (pdlb's own front) and false (aiohttp's
server): the guard is one object both call, so the answers must be the same.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from lb.errors import Overloaded, PayloadTooLarge, PdlbError
from lb.metrics import Metrics
from lb.request import ENDPOINT_PATHS
from lb.serve.app import METRICS, create_app
from lb.serve.guard import Guard, error_answer
from lb.serve.requesthead import ROUTES as FRONT_ROUTES
from lb.serve.routes import COMPLETION_PATHS, ROUTES, access
from tests.conftest import make_config
from tests.fake_vllm import FakeBehaviour, make_fake, run_app
from tests.rawhttp import BODY, post

FRONTS = pytest.mark.parametrize("fast_front", [True, False], ids=["front", "aiohttp"])


@pytest.fixture
async def pair() -> AsyncIterator[tuple[FakeBehaviour, FakeBehaviour, str, str]]:
    p, d = FakeBehaviour(), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        yield p, d, pu, du


def served_by_front(headers: dict[str, str]) -> bool:
    return "server" not in headers  # aiohttp's answers carry its Server header


# ------------------------------------------------------------------ Content-Encoding
@FRONTS
@pytest.mark.parametrize("coding,body", [
    ("gzip", BODY),                       # a plain body labelled gzip (was a 500 on aiohttp)
    ("gzip", gzip.compress(BODY)),        # a real one
    ("deflate", zlib.compress(BODY)),
    ("br", b"\x00\x01garbage"),
    ("gzip, identity", gzip.compress(BODY)),
], ids=["bad-gzip", "gzip", "deflate", "br", "gzip-identity"])
async def test_content_encoding_is_refused_on_both_fronts(pair, start_pdlb, connect, fast_front,
                                                         coding, body) -> None:
    """A compressed request body is refused with 415 and ``Accept-Encoding: identity``
    (RFC 7694), before anything is decoded; nothing reaches a backend and the connection
    serves the next request."""
    p, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du], server={"port": 0,
                                                             "fast_front": fast_front}))
    c = await connect(url)
    await c.send(post(body=body, extra=f"Content-Encoding: {coding}\r\n"))
    status, headers, answer = await c.response()
    assert status == 415, answer
    assert served_by_front(headers) == fast_front
    assert headers["accept-encoding"] == "identity"
    error = orjson.loads(answer)["error"]
    assert error["code"] == "unsupported_content_encoding"
    assert error["type"] == "invalid_request_error"
    assert not p.requests and not d.requests
    await c.send(post())
    assert (await c.response())[0] == 200


@FRONTS
@pytest.mark.parametrize("coding", ["identity", "Identity", ""])
async def test_identity_encoding_is_served(pair, start_pdlb, connect, fast_front,
                                           coding) -> None:
    _, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du], server={"port": 0,
                                                             "fast_front": fast_front}))
    c = await connect(url)
    await c.send(post(extra=f"Content-Encoding: {coding}\r\n"))
    status, headers, _ = await c.response()
    assert status == 200 and served_by_front(headers) == fast_front
    assert len(d.requests) == 1


@FRONTS
async def test_gzip_on_another_route_is_not_decoded(pair, start_pdlb, connect,
                                                    fast_front) -> None:
    """aiohttp never decompresses a request (auto_decompress off): a bad gzip body on a
    route that ignores bodies is not a 500."""
    _, _, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du], server={"port": 0,
                                                             "fast_front": fast_front}))
    c = await connect(url)
    await c.send(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
                 b"Content-Length: 5\r\n\r\nplain")
    assert (await c.response())[0] == 200
    await c.send(post())
    assert (await c.response())[0] == 200


# ------------------------------------------------------------------ access
@FRONTS
async def test_access_follows_the_route_table(pair, start_pdlb, connect, fast_front) -> None:
    """With API keys: completions and /v1/models need one, /health and /metrics do not, an
    unknown path needs one before it is a 404, admin paths are the admin token's."""
    _, _, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du], auth={"api_keys": ["k"]},
                                          server={"port": 0, "fast_front": fast_front}))
    c = await connect(url)
    for raw, expected in (
        (post(), 401),
        (post("/v1/chat/completions"), 401),
        (post(extra="Authorization: Bearer k\r\n"), 200),
        (post(extra="Authorization: bearer  k \r\n"), 200),
        (post(extra="Authorization: Basic k\r\n"), 401),
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 401),
        (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 401),
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\r\n", 404),
        (b"GET /admin/state HTTP/1.1\r\nHost: x\r\n\r\n", 404),  # admin API off
    ):
        await c.send(raw)
        status, _, body = await c.response()
        assert status == expected, (raw, status, body)


def test_one_route_table() -> None:
    """The app registers exactly the table's routes (admin ones with the admin API on), the
    front recognises exactly its completion routes, and those are the proxy's paths."""
    assert dict(COMPLETION_PATHS) == {path: ep for ep, path in ENDPOINT_PATHS.items()}
    assert {path.encode(): ep for path, ep in COMPLETION_PATHS.items()} == FRONT_ROUTES
    config = make_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"],
                         admin={"enabled": True, "token": "t"})
    app = create_app(config)
    registered = {(r.method, r.resource.canonical) for r in app.router.routes()
                  if r.resource is not None and r.method != "HEAD"}
    assert registered == {(r.method, r.path) for r in ROUTES}
    assert access("/health") == access("/metrics") == "public"
    assert access("/v1/completions") == access("/v1/models") == access("/x") == "key"
    assert access("/admin/reload") == access("/admin/other") == "admin"


# ------------------------------------------------------------------ errors and counting
@FRONTS
async def test_overload_answer_has_retry_after_on_both_fronts(pair, start_pdlb, connect,
                                                              fast_front) -> None:
    """An error's own headers (Retry-After, the saturated stage) reach the client whichever
    front answered, and the request is counted with its status."""
    p, _, pu, du = pair
    p.delay_s = 0.5
    url, app = await start_pdlb(make_config([pu], [du], server={
        "port": 0, "fast_front": fast_front, "max_concurrent_requests": 1}))
    busy, c = await connect(url), await connect(url)
    await busy.send(post())
    for _ in range(100):
        if p.requests:
            break
        await asyncio.sleep(0.02)
    await c.send(post())
    status, headers, body = await c.response()
    assert status == 503 and headers["retry-after"] == "1"
    assert headers["x-pdlb-saturated-stage"] == "server"
    assert orjson.loads(body)["error"]["type"] == "overloaded_error"
    assert (await busy.response())[0] == 200
    requests = app[METRICS].requests
    assert requests.labels(endpoint="completions", status="503").value == 1
    assert requests.labels(endpoint="completions", status="200").value == 1


@FRONTS
async def test_malformed_chunked_body_is_never_a_500(pair, start_pdlb, connect,
                                                     fast_front) -> None:
    """A chunked body whose framing breaks once the request is being read (aiohttp reads
    it, on both fronts). aiohttp's pure-Python parser reports it and pdlb answers 400
    ``invalid_body`` (it was a 500 ``internal_error``); its C parser (aiohttp 3.14) never
    wakes the reader, and the body timeout answers 408. A JSON error either way."""
    _, d, pu, du = pair
    url, _ = await start_pdlb(make_config([pu], [du], server={
        "port": 0, "fast_front": fast_front, "body_timeout_s": 0.5}))
    c = await connect(url)
    await c.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n")
    await asyncio.sleep(0.1)  # the handler is waiting for the rest of the body
    await c.send(b"zz\r\n")
    status, _, body = await c.response()
    code = orjson.loads(body)["error"]["code"]
    assert (status, code) in ((400, "invalid_body"), (408, "body_timeout")), body
    assert not d.requests


# ------------------------------------------------------------------ the guard alone
def _guard(**auth: Any) -> Guard:
    config = make_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"], auth=auth)
    return Guard(config, None, Metrics())  # type: ignore[arg-type]  # no request runs


@pytest.mark.parametrize("headers,expected", [
    ({}, None),
    ({"content-type": "application/json"}, None),
    ({"content-type": "Application/JSON; charset=utf-8"}, None),
    ({"content-type": ""}, None),
    ({"content-type": "application/octet-stream"}, None),
    ({"content-type": "text/plain"}, "unsupported_media_type"),
    ({"content-type": "multipart/form-data; boundary=x"}, "unsupported_media_type"),
    ({"content-encoding": "identity"}, None),
    ({"content-encoding": " IDENTITY "}, None),
    ({"content-encoding": "gzip"}, "unsupported_content_encoding"),
    ({"content-encoding": "identity, gzip"}, "unsupported_content_encoding"),
    ({"content-type": "text/plain", "content-encoding": "gzip"}, "unsupported_media_type"),
])
def test_check_completion(headers: dict[str, str], expected: str | None) -> None:
    guard = _guard()
    if expected is None:
        guard.check_completion(headers)
        return
    with pytest.raises(PdlbError) as caught:
        guard.check_completion(headers)
    assert caught.value.status == 415 and caught.value.code == expected


def test_keys_are_checked_before_anything_else() -> None:
    guard = _guard(api_keys=["k1", "k2"])
    guard.check_completion({"authorization": "Bearer k2"})
    for authorization in (None, "", "Bearer", "Bearer k3", "Basic k1", "k1"):
        headers = {"content-type": "text/plain"}
        if authorization is not None:
            headers["authorization"] = authorization
        with pytest.raises(PdlbError) as caught:
            guard.check_completion(headers)
        assert caught.value.status == 401, authorization
    guard.check_access("/health", None)
    guard.check_access("/admin/reload", None)  # the admin token is the handler's
    with pytest.raises(PdlbError):
        guard.check_access("/v1/models", "Bearer nope")


def test_error_answers() -> None:
    """Status, body and headers come from the error; 408 and 413 close the connection."""
    overloaded = Overloaded("busy", stage="decode", reason="queue_full", status=429,
                            retry_after_s=2.4)
    answer = error_answer(overloaded)
    assert answer.status == 429 and not answer.close
    assert answer.headers["Retry-After"] == "2"
    assert orjson.loads(answer.body)["error"]["code"] == "queue_full"
    assert error_answer(_guard().body_timeout()).close
    assert error_answer(PayloadTooLarge("big")).close
    assert not error_answer(PdlbError("x", status=400)).close
