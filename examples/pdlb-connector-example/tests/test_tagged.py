"""Unit tests for the tagged connector, with pdlb's kit: no server, no event loop."""

from __future__ import annotations

import pytest

from lb.connectors.testing import build, request, run_handshake
from lb.errors import ConfigError


def test_both_legs_carry_the_tag():
    legs = run_handshake(build("tagged", {"tag": "blue"}), request("hi", max_tokens=8))
    assert legs.dispatch.prefill_headers == legs.dispatch.decode_headers == {"X-Tag": "blue"}
    assert legs.prefill_body["max_tokens"] == 1 and legs.decode_body["max_tokens"] == 8


def test_the_decode_gets_the_clients_body_unchanged():
    client = request(messages=[{"role": "user", "content": "x"}], stream=True)
    legs = run_handshake(build("tagged"), client)
    assert legs.decode_body == dict(client.body)
    assert legs.dispatch.decode_headers == {"X-Tag": "pd"}


def test_bad_option_is_named():
    with pytest.raises(ConfigError, match=r"kv_transfer\.tag = 5: expected a string"):
        build("tagged", {"tag": 5})
