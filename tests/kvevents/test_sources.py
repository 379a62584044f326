"""Endpoints from vLLM's ``GET /kv_event_sources`` answer, as a backend URL sees them."""

from __future__ import annotations

from lb.backends.kvevents import Endpoint, parse_sources

VLLM = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:5557",
        "replay_endpoint": None, "buffer_steps": 10000, "hwm": 100000,
        "max_queue_size": 100000, "topic": "kv"}


def test_wildcard_becomes_the_backend_host() -> None:
    """vLLM 0.32's answer: ``*`` is the server's own address."""
    assert parse_sources({"0": VLLM}, "http://10.0.0.5:8100") == [
        Endpoint("tcp://10.0.0.5:5557", None, "kv")]


def test_one_endpoint_per_dp_rank() -> None:
    """Ranks given the base config get vLLM's port offset; explicit ones are kept."""
    ranks = {"0": {**VLLM, "replay_endpoint": "tcp://*:6000"},
             "1": {**VLLM, "replay_endpoint": "tcp://*:6000"}}
    assert parse_sources(ranks, "http://h:1") == [Endpoint("tcp://h:5557", "tcp://h:6000", "kv"),
                                                  Endpoint("tcp://h:5558", "tcp://h:6001", "kv")]
    explicit = {"0": VLLM, "1": {**VLLM, "endpoint": "tcp://0.0.0.0:7000"}}
    assert [e.endpoint for e in parse_sources(explicit, "http://[::1]:1")] == [
        "tcp://[::1]:5557", "tcp://[::1]:7000"]


def test_no_events() -> None:
    """Events off, another publisher, or not an answer at all: no endpoints."""
    assert parse_sources({}, "http://h:1") == []
    assert parse_sources({"0": {**VLLM, "enable_kv_cache_events": False}}, "http://h:1") == []
    assert parse_sources({"0": {**VLLM, "publisher": "null"}}, "http://h:1") == []
    assert parse_sources(["not", "a", "dict"], "http://h:1") == []
    assert parse_sources({"0": "garbage"}, "http://h:1") == []
