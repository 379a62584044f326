"""Connector selection, option checks and start-up validation: clear errors, never a request."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from lb.connectors.registry import BUILTINS, available, build_connector
from lb.errors import ConfigError
from lb.serve.app import PROXY, create_app
from lb.serve.server import start_site
from tests.conftest import make_config
from tests.connectors.kvpd import ALL

P, D = "http://10.0.0.1:8100", "http://10.0.0.2:8200"


def config(connector: str, **options):
    return make_config([P], [D], kv_transfer={"connector": connector, **options})


def test_every_builtin_is_registered_as_an_entry_point():
    """The pdlb.connectors group lists the built-ins (so a plugin registers the same way)."""
    names = {ep.name for ep in entry_points(group="pdlb.connectors")}
    assert set(ALL) <= names and set(BUILTINS) == set(ALL)
    assert set(ALL) <= set(available())


def test_unknown_connector_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"unknown connector \(available: lmcache, mooncake"):
        build_connector("nope", {}, "backends.toml")


@pytest.mark.parametrize("connector, options, message", [
    ("shared_storage", {"path": "/x"}, r"kv_transfer\.path: unknown key for connector"
                                       r" 'shared_storage' \(known here: none\)"),
    ("nixl", {"rewrite_remote_host": "sometimes"}, r"kv_transfer\.rewrite_remote_host ="
                                                   r" 'sometimes': expected \"auto\", "),
    ("mooncake", {"bootstrap_port": "8998"}, r"kv_transfer\.bootstrap_port = '8998': expected"
                                             r" an integer"),
    ("mooncake", {"bootstrap_port": 70000}, r"expected a TCP port"),
    ("mooncake", {"backends": {P: {"engine_id": "x"}}},
     r'kv_transfer\.backends\."http://10\.0\.0\.1:8100"\.engine_id: unknown key for'
     r" connector 'mooncake' \(known here: bootstrap_host, bootstrap_port\)"),
    ("mooncake", {"backends": {"http://10.0.0.9:1": {"bootstrap_port": 1}}},
     r'kv_transfer\.backends\."http://10\.0\.0\.9:1": no such backend'),
    ("nixl_push", {}, r'kv_transfer\.backends\."http://10\.0\.0\.1:8100"\.engine_id: missing'),
    ("nixl_push", {"backends": {P: {"engine_id": "e", "tp_size": 0}}}, r"tp_size = 0: must be"),
    ("p2p_nccl", {"backends": {P: {"zmq_address": "10.0.0.1:21001"}}},
     r"zmq_address: missing.*none for: http://10\.0\.0\.2:8200"),
    ("p2p_nccl", {"backends": {P: {"zmq_address": "10.0.0.1"}, D: {"zmq_address": "d:1"}}},
     r'zmq_address = \'10\.0\.0\.1\': expected "host:port"'),
    ("sglang", {}, r"needs the bootstrap port of every prefill.*none for: http://10\.0\.0\.1"),
    ("sglang", {"bootstrap_port": 8998, "check_bootstrap": "yes"}, r"expected true or false"),
])
def test_bad_options_stop_start_up_naming_the_key(connector, options, message):
    """Static checks run when the app is built (the CLI exits 2 before binding)."""
    with pytest.raises(ConfigError, match=message) as info:
        create_app(config(connector, **options))
    assert str(info.value).startswith("<test>: ")


def test_duplicate_push_engine_ids_are_refused():
    cfg = make_config([P, "http://10.0.0.3:8100"], [D], kv_transfer={
        "connector": "nixl_push",
        "backends": {P: {"engine_id": "e"}, "http://10.0.0.3:8100": {"engine_id": "e"}}})
    with pytest.raises(ConfigError, match=r"the same engine id as http://10\.0\.0\.1:8100"):
        create_app(cfg)


def test_valid_options_build():
    create_app(config("sglang", bootstrap_port=8998, check_bootstrap=False))
    create_app(config("mooncake"))
    create_app(config("nixl_push", side_channel_port=5601,
                      backends={P: {"engine_id": "prefill-1", "kv_host": "10.1.0.1"}}))
    create_app(config("p2p_nccl", backends={P: {"zmq_address": "10.0.0.1:21001"},
                                            D: {"zmq_address": "[::1]:22001"}}))


async def test_mooncake_bootstrap_unreachable_stops_start_up():
    """A prefill whose bootstrap /query never answers: start-up fails naming it."""
    cfg = make_config(["http://127.0.0.1:9"], ["http://127.0.0.1:10"], kv_transfer={
        "connector": "mooncake", "bootstrap_port": 9, "startup_timeout_s": 0.3})
    with pytest.raises(ConfigError, match=r"prefill http://127\.0\.0\.1:9: its bootstrap server"
                                          r" http://127\.0\.0\.1:9/query gave no usable answer"):
        await start_site(cfg)


async def test_sglang_bootstrap_unreachable_stops_start_up():
    cfg = make_config(["http://127.0.0.1:9"], ["http://127.0.0.1:10"], kv_transfer={
        "connector": "sglang", "bootstrap_port": 9, "startup_timeout_s": 0.3})
    with pytest.raises(ConfigError, match=r"bootstrap server http://127\.0\.0\.1:9/health did"
                                          r" not answer"):
        await start_site(cfg)


async def test_mooncake_discovery_against_the_emulator(make_pd, http):
    """Discovery reads every DP rank's engine id from each prefill's bootstrap /query."""
    async with make_pd("mooncake", 2, 1, prefill={"data_parallel_size": 3}) as pd:
        async with http.post(pd.url + "/v1/completions",
                             json={"prompt": "hi", "max_tokens": 2}) as r:
            assert r.status == 200
        connector = pd.app[PROXY].connector
        for p in pd.prefills:
            base = p.engine.engine_id
            assert connector.engines[p.url] == (f"{base}_dp0", f"{base}_dp1", f"{base}_dp2")
