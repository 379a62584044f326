"""A third-party consumer of vLLM's events reads the emulator's stream unchanged: the
minimal subscriber of shared/reference/kv-events.md (plain pyzmq + msgspec, no pdlb code),
run as its own process against an emulator with ``--kv-events-endpoint``."""

from __future__ import annotations

import asyncio
import json
import socket
import sys

import aiohttp

from emulator import EmulatorConfig, EmulatorServer

# The reference's subscriber, as written there, but ending after a BlockStored (bounded by
# its own deadline too) and printing what it read as JSON.
CONSUMER = r"""
import json, sys, time, msgspec, zmq
s = zmq.Context().socket(zmq.SUB)
s.connect(sys.argv[2]); s.setsockopt(zmq.SUBSCRIBE, b"")
print("ready", flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    if s.poll(500):
        topic, seq, payload = s.recv_multipart()
        ts, events, *rank = msgspec.msgpack.decode(payload)
        print(json.dumps([topic.decode(), int.from_bytes(seq, "big"), rank, events]), flush=True)
        if any(e["type"] == "BlockStored" for e in events):
            break
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_reference_consumer_reads_the_emulator() -> None:
    """Topic, sequence, rank and a BlockStored with vLLM's fields, read by foreign code."""
    port = free_port()
    config = EmulatorConfig(role="both", time_scale=50.0, block_size=16,
                            kv_events_endpoint=f"tcp://*:{port}")
    async with EmulatorServer(config) as server, aiohttp.ClientSession() as http:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CONSUMER, "20", f"tcp://127.0.0.1:{port}",
            stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        try:
            assert (await proc.stdout.readline()).strip() == b"ready"
            lines: list[list[object]] = []
            for i in range(200):  # until the consumer's subscription has arrived
                prompt = [5, i + 1] * 24
                async with http.post(server.url + "/v1/completions", json={
                        "model": "emulated-model", "prompt": prompt, "max_tokens": 1}) as r:
                    assert r.status == 200
                try:
                    async with asyncio.timeout(0.05):
                        line = await proc.stdout.readline()
                except TimeoutError:
                    continue
                lines.append(json.loads(line))
                break
            assert lines, "the consumer never read an event"
            topic, seq, rank, events = lines[0]
            assert topic == "kv" and isinstance(seq, int) and rank == [0]
            assert isinstance(events, list)
            stored = events[0]
            assert stored["type"] == "BlockStored"
            assert {"block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                    "medium", "lora_name"} <= set(stored)
            assert stored["block_size"] == 16 and len(stored["token_ids"]) == 16 * 3
            assert stored["token_ids"][:2] == [5, i + 1]
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
