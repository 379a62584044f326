"""Usage stitching and the SSE relay, byte by byte."""

from __future__ import annotations

import orjson
import pytest

from lb.connectors.base import PrefillResult
from lb.stream.relay import SSERelay, stitch_usage

PREFILL = PrefillResult(handoff={}, usage={"prompt_tokens": 100, "completion_tokens": 1,
                                           "total_tokens": 101,
                                           "prompt_tokens_details": {"cached_tokens": 64}},
                        prompt_tokens=100, cached_tokens=64)


def test_stitch_takes_prompt_side_from_prefill():
    decode = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
              "prompt_tokens_details": {"cached_tokens": 100}}
    assert stitch_usage(decode, PREFILL) == {
        "prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
        "prompt_tokens_details": {"cached_tokens": 64}}


def test_stitch_uses_remote_prefill_cached_tokens_when_usage_lacks_details():
    prefill = PrefillResult(handoff={}, usage={"prompt_tokens": 50}, prompt_tokens=50,
                            cached_tokens=16)
    out = stitch_usage({"prompt_tokens": 50, "completion_tokens": 3}, prefill)
    assert out["prompt_tokens_details"] == {"cached_tokens": 16} and out["total_tokens"] == 53


def test_stitch_drops_decode_figure_when_prefill_says_nothing():
    prefill = PrefillResult(handoff={}, usage=None, prompt_tokens=None, cached_tokens=None)
    out = stitch_usage({"prompt_tokens": 9, "completion_tokens": 1,
                        "prompt_tokens_details": {"cached_tokens": 9}}, prefill)
    assert out["prompt_tokens_details"] is None and out["prompt_tokens"] == 9


def events(n: int, sep: bytes = b"\n\n") -> bytes:
    chunks = [b"data: " + orjson.dumps({"choices": [{"text": f"t{i}"}]}) + sep for i in range(n)]
    usage = {"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": n,
                                      "total_tokens": 100 + n}}
    chunks.append(b"data: " + orjson.dumps(usage) + sep)
    chunks.append(b"data: [DONE]" + sep)
    return b"".join(chunks)


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"])
@pytest.mark.parametrize("piece", [1, 3, 7, 50, 10_000])
def test_relay_any_split_gives_same_result(sep, piece):
    """Whatever the read boundaries, the output is the input with only usage rewritten."""
    raw = events(5, sep)
    relay = SSERelay(PREFILL)
    out = b"".join(relay.feed(raw[i:i + piece]) for i in range(0, len(raw), piece))
    out += relay.flush()
    assert relay.saw_done and relay.rewrites == 1
    expected_usage = {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
                      "prompt_tokens_details": {"cached_tokens": 64}}
    blocks = out.replace(b"\r\n", b"\n").split(b"\n\n")
    assert orjson.loads(blocks[5][6:])["usage"] == expected_usage
    # everything but the usage event is byte-identical
    assert out.split(sep)[:5] == raw.split(sep)[:5]


def test_relay_passes_content_chunks_untouched_and_holds_only_partial_events():
    relay = SSERelay(PREFILL)
    chunk = b'data: {"choices":[{"text":"a"}]}\n\n'
    assert relay.feed(chunk) == chunk
    assert relay.feed(b'data: {"choi') == b""
    assert relay.feed(b'ces":[{"text":"b"}]}\n\ndata: [DO') == b'data: {"choices":[{"text":"b"}]}\n\n'
    assert not relay.saw_done
    assert relay.feed(b"NE]\n\n") == b"data: [DONE]\n\n"
    assert relay.saw_done


def test_relay_leaves_error_events_and_unrelated_usage_alone():
    relay = SSERelay(PREFILL)
    err = b'data: {"error": {"message": "x"}}\n\n'
    cont = b'data: {"choices":[{"text":"a"}],"usage":{"prompt_tokens":1}}\n\n'
    assert relay.feed(err + cont) == err + cont
    assert relay.rewrites == 0


@pytest.mark.parametrize("piece", [1, 5, 10_000])
def test_relay_without_prefill_passes_everything_and_still_sees_done(piece):
    """A decode-only stream (nothing to stitch) goes through byte for byte, usage event
    included; [DONE] is noticed even when it is split across reads."""
    raw = events(3)
    relay = SSERelay(None)
    out = b"".join(relay.feed(raw[i:i + piece]) for i in range(0, len(raw), piece))
    out += relay.flush()
    assert out == raw
    assert relay.saw_done and relay.rewrites == 0


def test_relay_without_done_says_so():
    """A stream cut before [DONE] (its tail flushed as is) is recognisable as truncated."""
    relay = SSERelay(None)
    assert relay.feed(b"data: {}\n\ndata: [DO") == b"data: {}\n\n"
    assert relay.flush() == b"data: [DO"
    assert not relay.saw_done
