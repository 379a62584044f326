"""The decoder reads payloads built exactly as vLLM builds them, and never raises."""

from __future__ import annotations

import msgspec
import pytest

from lb.backends.kvevents.wire import AllBlocksCleared, BlockRemoved, BlockStored, Decoder
from tests.kvevents import vllm_structs as v


@pytest.mark.parametrize("array_like", [True, False])
def test_vllm_batch_decodes(array_like: bool) -> None:
    """All three event types, array-like or map batch, int and bytes hashes."""
    raw = v.payload(v.stored([1, b"\x02" * 32], None, list(range(8)), extra_keys=[None, ("s",)]),
                    v.BlockRemoved(block_hashes=[1], medium="GPU"), v.AllBlocksCleared(),
                    array_like=array_like, rank=3)
    msg = Decoder().frames([b"kv", (7).to_bytes(8, "big"), raw])
    assert msg.seq == 7 and msg.dp_rank == 3 and msg.ts == 1.5
    assert (msg.unknown, msg.malformed) == (0, 0)
    first, second, third = msg.events
    assert isinstance(first, BlockStored) and first.block_hashes == [1, b"\x02" * 32]
    assert first.token_ids == list(range(8)) and first.block_size == 4
    assert first.extra_keys == [None, ["s"]]
    assert isinstance(second, BlockRemoved) and second.medium == "GPU"
    assert isinstance(third, AllBlocksCleared)


def test_unknown_fields_and_types_are_skipped() -> None:
    """A newer vLLM's fields are ignored; an event type pdlb does not know is counted."""
    raw = v.payload(v.BlockMoved(block_hashes=[1], to="CPU"),
                    v.stored([5], None, [1, 2, 3, 4], kv_cache_spec_kind="full"))
    msg = Decoder().payload(0, raw)
    assert msg.unknown == 1 and msg.malformed == 0
    assert [type(e).__name__ for e in msg.events] == ["BlockStored"]


@pytest.mark.parametrize("raw", [
    b"\xc1not msgpack", msgspec.msgpack.encode("a string"), msgspec.msgpack.encode([1.0]),
    msgspec.msgpack.encode({"ts": 1.0}), msgspec.msgpack.encode([1.0, "events?"]), b"",
])
def test_malformed_payload_is_counted(raw: bytes) -> None:
    """Garbage is one malformed payload, no events, no exception."""
    msg = Decoder().payload(4, raw)
    assert msg.events == [] and msg.malformed == 1


def test_malformed_event_keeps_the_others() -> None:
    """One broken event among good ones: the good ones survive."""
    raw = msgspec.msgpack.encode([1.0, [{"type": "BlockRemoved", "block_hashes": "x"},
                                        {"type": "AllBlocksCleared"}, 17]])
    msg = Decoder().payload(0, raw)
    assert msg.malformed == 2 and [type(e).__name__ for e in msg.events] == ["AllBlocksCleared"]


@pytest.mark.parametrize("frames", [[b"kv", b"\x00"], [b"kv", b"\x00" * 3, b""], []])
def test_bad_frames(frames: list[bytes]) -> None:
    """Not [topic, 8-byte seq, payload]: malformed, seq -1."""
    msg = Decoder().frames(frames)
    assert msg.seq == -1 and msg.malformed == 1
