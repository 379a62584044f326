"""The kit shipped for connector authors (lb.connectors.testing) behaves like pdlb."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

import lb.connectors.registry as registry
from lb.connectors.base import BackendRef, HandshakeMode, RequestView
from lb.connectors.nixl import NixlConnector
from lb.connectors.testing import (
    DECODE_URL,
    PREFILL_URL,
    build,
    completion_answer,
    fake_get_json,
    request,
    run_handshake,
)
from lb.errors import ConfigError, PdlbError, PrefillFailed

NIXL_PARAMS = {"remote_engine_id": "e0", "remote_host": "localhost", "remote_port": 5600,
               "remote_block_ids": [1, 2], "do_remote_prefill": True}


def test_backend_refs_are_views_of_the_url():
    """BackendRef parses host and port (defaults by scheme) and knows loopback names."""
    ref = BackendRef.of("http://[::1]:8100/")
    assert (ref.url, ref.host, ref.port, ref.is_loopback) == ("http://[::1]:8100", "::1", 8100,
                                                                True)
    assert BackendRef.of("https://10.0.0.1").port == 443
    assert not BackendRef.of("http://10.0.0.1:1").is_loopback


def test_request_builds_completions_and_chats():
    """request() gives the view pdlb would pass: endpoint, path and stream follow the body."""
    r = request("hi", max_tokens=3, stream=True)
    assert isinstance(r, RequestView) and r.stream and r.path == "/v1/completions"
    chat = request(messages=[{"role": "user", "content": "x"}])
    assert (chat.endpoint, chat.path, chat.stream) == ("chat", "/v1/chat/completions", False)
    with pytest.raises(ValueError, match="not both"):
        request("a", messages=[])


def test_build_runs_pdlbs_start_up_checks():
    """build() goes through the registry: options and per-backend tables are checked with
    pdlb's messages, check_backends runs on the given pools."""
    assert isinstance(build("nixl"), NixlConnector)
    with pytest.raises(ConfigError, match=r"^<test>: kv_transfer\.backends\.\"http://prefill-0"
                                          r":8100\"\.engine_id: missing"):
        build("nixl_push")
    with pytest.raises(ConfigError, match=r"kv_transfer\.x: unknown key for connector 'nixl'"):
        build("nixl", {"x": 1})


def test_sequential_handshake_feeds_the_prefill_result_to_the_decode():
    """nixl (SEQUENTIAL_REUSABLE): no decode in the dispatch; the accepted params, with a
    loopback remote_host rewritten to the prefill's host, go to the decode."""
    legs = run_handshake(build("nixl"), request("hi", max_tokens=9),
                         prefill="http://10.0.0.5:8100",
                         prefill_answer=completion_answer(kv_transfer_params=NIXL_PARAMS))
    assert legs.dispatch.decode is None and legs.dispatch.prefill.host == "10.0.0.5"
    assert legs.prefill_body["max_tokens"] == 1 and legs.prefill_body["stream"] is False
    assert legs.decode_body["max_tokens"] == 9
    assert legs.decode_body["kv_transfer_params"]["remote_host"] == "10.0.0.5"
    assert legs.prefill.prompt_tokens == 5


def test_a_veto_propagates():
    """accept_prefill's PrefillFailed reaches the test as it reaches the proxy."""
    with pytest.raises(PrefillFailed) as info:
        run_handshake(build("nixl"))
    assert info.value.reason == "missing_kv_transfer_params"


def test_concurrent_handshake_names_both_backends_and_gives_no_prefill_to_the_decode():
    """sglang (CONCURRENT): both backends in the dispatch, the same room on both legs."""
    connector = build("sglang", {"bootstrap_port": 8998, "check_bootstrap": False})
    assert connector.mode is HandshakeMode.CONCURRENT
    legs = run_handshake(connector, request("hi", stream=True))
    assert legs.dispatch.decode == BackendRef.of(DECODE_URL)
    assert legs.prefill_body["bootstrap_room"] == legs.decode_body["bootstrap_room"]
    assert legs.prefill_body["stream"] is False and legs.decode_body["stream"] is True


def test_decode_first_handshake_names_the_decode():
    """p2p_nccl (DECODE_FIRST): the request id carries both ZMQ addresses."""
    connector = build("p2p_nccl", {"backends": {PREFILL_URL: {"zmq_address": "p:1"},
                                                DECODE_URL: {"zmq_address": "d:2"}}})
    legs = run_handshake(connector)
    assert legs.dispatch.request_id.startswith("___prefill_addr_p:1___decode_addr_d:2_")


async def test_fake_get_json_answers_known_urls_and_fails_like_pdlb():
    """fake_get_json serves a start() hook: known URLs answer, others raise a PdlbError."""
    get_json = fake_get_json({"http://b:1/query": {"0": {"engine_id": "e"}}})
    assert await get_json("http://b:1/query") == {"0": {"engine_id": "e"}}
    with pytest.raises(PdlbError):
        await get_json("http://b:2/query")
    connector = build("mooncake")
    await connector.start([BackendRef.of(PREFILL_URL)], [],  # type: ignore[attr-defined]
                          fake_get_json({"http://prefill-0:8998/query":
                                         {"0": {"engine_id": "e0"}}}))
    assert run_handshake(connector).decode_body["kv_transfer_params"]["remote_engine_id"] == "e0"


class OldFlags:
    """A connector written for the three booleans the mode replaced."""

    name = "old"
    concurrent = False
    decode_first = False
    reusable_handoff = True

    def __init__(self, options):
        pass

    def new_dispatch(self, request, prefill, decode): ...
    def prefill_body(self, request, dispatch): ...
    def accept_prefill(self, response, dispatch): ...
    def decode_body(self, request, dispatch, prefill): ...


def test_a_connector_without_a_mode_is_refused_naming_the_replacement(monkeypatch):
    """The registry checks the interface at start-up and explains the old flags."""
    monkeypatch.setattr(registry, "BUILTINS", {**registry.BUILTINS, "old": f"{__name__}:OldFlags"})
    with pytest.raises(ConfigError, match=r"its 'mode' must be a lb\.connectors\.base\."
                                          r"HandshakeMode \(it sets concurrent, decode_first,"
                                          r" reusable_handoff: those booleans were replaced"):
        build("old")


def test_a_plugin_cannot_take_a_builtins_name(monkeypatch, caplog):
    """Built-in names are reserved, as the registry's docstring says: an entry point named
    like a built-in is ignored with a warning; one with a new name is found."""
    plugins = [EntryPoint("nixl", f"{__name__}:OldFlags", registry.GROUP),
               EntryPoint("nixl", registry.BUILTINS["nixl"], registry.GROUP),  # pdlb's own
               EntryPoint("old", f"{__name__}:OldFlags", registry.GROUP)]
    monkeypatch.setattr(registry, "entry_points", lambda group: plugins)
    with caplog.at_level("WARNING", logger="pdlb.connectors"):
        found = registry.available()
    warned = [r.getMessage() for r in caplog.records]
    assert found["nixl"] == registry.BUILTINS["nixl"] and found["old"].endswith(":OldFlags")
    assert isinstance(build("nixl"), NixlConnector)
    assert len(warned) == 1 and "is ignored: 'nixl' is a built-in connector's name" in warned[0]
