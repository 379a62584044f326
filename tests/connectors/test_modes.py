"""The proxy follows a connector's HandshakeMode when a decode is retried before its first
byte: SEQUENTIAL redoes the prefill, SEQUENTIAL_REUSABLE reuses its result when the decode
was never reached."""

from __future__ import annotations

import pytest

import lb.connectors.registry as registry
from lb.connectors.base import HandshakeMode
from lb.connectors.plain import SharedStorageConnector
from tests.conftest import make_config
from tests.fake_vllm import FakeBehaviour, make_fake, run_app

DEAD = "http://127.0.0.1:9"


class SingleUse(SharedStorageConnector):
    """The shared-storage handshake, declared single-use."""

    name = "single_use"
    mode = HandshakeMode.SEQUENTIAL


@pytest.mark.parametrize("connector, prefills", [("shared_storage", 1), ("single_use", 2)])
async def test_a_refused_decode_reuses_or_redoes_the_prefill_by_mode(
        monkeypatch, start_pdlb, http, connector, prefills):
    """The first decode backend refuses the connection; the retry on the second reuses the
    prefill (SEQUENTIAL_REUSABLE) or prefills again (SEQUENTIAL)."""
    monkeypatch.setattr(registry, "BUILTINS",
                        {**registry.BUILTINS, "single_use": f"{__name__}:SingleUse"})
    p, d = FakeBehaviour(), FakeBehaviour()
    async with run_app(make_fake("prefill", p)) as pu, run_app(make_fake("decode", d)) as du:
        config = make_config([pu], [DEAD, du], kv_transfer={"connector": connector},
                             pools={"decode": {"policy": "round_robin"}},
                             health={"interval_s": 60, "failures_to_eject": 5})
        url, _ = await start_pdlb(config)
        async with http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}) as r:
            assert r.status == 200, await r.text()
    assert len(d.requests) == 1 and len(p.requests) == prefills
