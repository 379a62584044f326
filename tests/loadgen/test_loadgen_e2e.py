"""End-to-end runs against the fake SSE server on a real socket (no mocked HTTP client)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from loadgen import SLO, LengthDist, LoadConfig, LoadgenError, RunResult, run
from loadgen.progress import Progress
from loadgen.testing import BODIES, FAKE_STAGE_SECONDS

StartServer = Callable[..., Awaitable[tuple[str, web.Application]]]

SMALL = {"input_len": LengthDist(16), "output_len": LengthDist(8)}


@pytest.mark.parametrize("client", ["fast", "aiohttp"])
async def test_open_loop_completions(fake_server: StartServer, client: str) -> None:
    """Every request completes; tokens come from usage; per-chunk token counts recorded."""
    url, _ = await fake_server()
    res = await run(LoadConfig(url=url, rate=200, num_requests=40, http_client=client, **SMALL))
    s = res.summary
    assert s["completed"] == 40 and s["failed"] == 0
    assert s["total_output_tokens"] == 40 * 8
    assert s["token_counts_from"] == "usage"
    assert s["ttft_ms"]["count"] == 40 and s["ttft_ms"]["p50"] > 0
    assert s["itl_ms"]["count"] == 40 * 7
    assert s["itl_per_token_ms"]["count"] == 40 * 7
    assert s["schedule_lag_ms"]["count"] == 40
    assert all(list(r.chunk_tokens or ()) == [1] * 8 for r in res.records)
    assert all(r.scheduled <= r.sent for r in res.records if r.sent is not None)
    assert res.meta["model"] == "fake-model"
    assert res.meta["time_to_first_send_s"] < 5


@pytest.mark.parametrize("client", ["fast", "aiohttp"])
async def test_chat_ttft_ignores_role_only_chunk(fake_server: StartServer, client: str) -> None:
    """The role-only first chunk arrives at once; TTFT waits for the first content (50 ms)."""
    url, _ = await fake_server(ttft_s=0.05)
    res = await run(LoadConfig(url=url, endpoint="chat", rate=100, num_requests=5,
                               http_client=client, **SMALL))
    assert res.summary["completed"] == 5
    assert res.summary["ttft_ms"]["min"] >= 50.0
    assert all(len(r.chunk_times) == 8 for r in res.records)


async def test_bundled_chunks_token_normalised_itl(fake_server: StartServer) -> None:
    """4 tokens per chunk: 4 chunks, per-token ITL = per-chunk ITL / 4, TPOT from usage."""
    url, _ = await fake_server(tokens_per_chunk=4, chunk_interval_s=0.02)
    res = await run(LoadConfig(url=url, rate=50, num_requests=4, input_len=LengthDist(8),
                               output_len=LengthDist(16)))
    s = res.summary
    assert all(list(r.chunk_tokens or ()) == [4, 4, 4, 4] for r in res.records)
    assert s["itl_ms"]["p50"] > 5.0  # server sleeps 20 ms between chunks
    assert s["itl_per_token_ms"]["p50"] == pytest.approx(s["itl_ms"]["p50"] / 4, rel=1e-6)
    # TPOT divides by usage tokens - 1 (15), not by chunks - 1 (3)
    tpots = sorted((r.chunk_times[-1] - r.chunk_times[0]) / 15 * 1000 for r in res.records)
    assert s["tpot_ms"]["max"] == pytest.approx(tpots[-1])


async def test_without_continuous_usage(fake_server: StartServer) -> None:
    """Without per-chunk usage, counts still come from the final usage event."""
    url, app = await fake_server(tokens_per_chunk=2, record_bodies=True)
    res = await run(LoadConfig(url=url, rate=50, num_requests=3, continuous_usage=False,
                               **SMALL))
    assert res.summary["total_output_tokens"] == 24
    assert all(r.chunk_tokens is None for r in res.records)
    assert res.summary["itl_per_token_unavailable"] == 3
    sent = app[BODIES][-1]
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["ignore_eos"] is True and sent["max_tokens"] == 8


@pytest.mark.parametrize("client", ["fast", "aiohttp"])
async def test_failures_counted_and_miss_the_slo(fake_server: StartServer, client: str) -> None:
    """HTTP errors and streams cut short are failures, reported apart and as SLO misses."""
    url, _ = await fake_server(fail_every=5, fail_midstream_every=7)
    res = await run(LoadConfig(url=url, rate=200, num_requests=35, preflight=False,
                               http_client=client,
                               slo=SLO(ttft_ms=10_000), slo_target=0.9, **SMALL))
    s = res.summary
    # requests 5,10,...,35 → 500 (7 of them); 7,14,21,28 → cut (35 is already a 500)
    assert s["failed"] == 11 and s["completed"] == 24
    assert any(k.startswith("HTTP 500") for k in s["errors"])
    assert any("ended early" in k for k in s["errors"])
    assert s["slo_attainment"] == pytest.approx(24 / 35)
    assert s["slo_met"] is False
    assert s["ttft_ms"]["count"] == 24


async def test_closed_loop_respects_concurrency(fake_server: StartServer) -> None:
    """N users never have more than N requests in flight; each is sent when ready."""
    url, _ = await fake_server(chunk_interval_s=0.002)
    res = await run(LoadConfig(url=url, concurrency=3, num_requests=15, **SMALL))
    assert res.summary["completed"] == 15
    assert res.summary["peak_in_flight"] <= 3
    assert res.summary["schedule_lag_ms"]["max"] < 250


async def test_open_loop_cap_records_slot_wait(fake_server: StartServer) -> None:
    """With --max-concurrency the wait for a slot is recorded, not hidden in the lag."""
    url, _ = await fake_server(chunk_interval_s=0.01)
    res = await run(LoadConfig(url=url, rate=500, num_requests=20, max_concurrency=2,
                               **SMALL))
    s = res.summary
    assert s["peak_in_flight"] <= 2
    assert s["queue_wait_ms"]["max"] > 50
    assert s["ttft_from_scheduled_ms"]["p99"] > s["ttft_ms"]["p99"]
    assert s["schedule_lag_ms"]["p50"] < s["queue_wait_ms"]["max"]


async def test_multi_turn_sessions_carry_history(fake_server: StartServer) -> None:
    """Each later turn sends the earlier turns and the server's actual answers."""
    url, app = await fake_server(record_bodies=True)
    res = await run(LoadConfig(url=url, endpoint="chat", rate=50, num_requests=6, turns=3,
                               preflight=False, **SMALL))
    assert res.summary["completed"] == 6
    assert sorted({r.session for r in res.records}) == [0, 1]
    assert sorted(r.turn for r in res.records) == [0, 0, 1, 1, 2, 2]
    lengths = sorted(len(b["messages"]) for b in app[BODIES])
    assert lengths == [1, 1, 3, 3, 5, 5]
    third = next(b for b in app[BODIES] if len(b["messages"]) == 5)
    assert third["messages"][1] == {"role": "assistant", "content": "tok " * 8}


async def test_shared_prefix_groups_on_the_wire(fake_server: StartServer) -> None:
    """2 groups × 3 questions: the server sees 2 distinct system prompts, 3 times each."""
    url, app = await fake_server(record_bodies=True)
    res = await run(LoadConfig(url=url, endpoint="chat", rate=100, num_requests=6,
                               prefix_groups=2, questions_per_group=3, prefix_len=32,
                               preflight=False, **SMALL))
    assert res.summary["completed"] == 6
    systems = [b["messages"][0]["content"] for b in app[BODIES]]
    assert sorted(systems.count(s) for s in set(systems)) == [3, 3]


async def test_trace_replay_follows_timestamps(fake_server: StartServer, tmp_path: Path) -> None:
    """A JSONL trace is sent at its timestamps (scaled), not at a rate."""
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(
        orjson.dumps({"prompt": "hello world", "max_tokens": 4, "timestamp": 10 + t}).decode()
        + "\n" for t in (0.0, 0.2, 0.4, 0.8)))
    url, _ = await fake_server()
    res = await run(LoadConfig(url=url, dataset=str(trace), time_scale=2.0))
    assert [r.scheduled for r in res.records] == pytest.approx([0.0, 0.1, 0.2, 0.4])
    for r in res.records:
        assert r.sent is not None and r.sent - r.scheduled < 0.25
    assert res.config["resolved"]["mode"] == "trace"


async def test_pdlb_stage_breakdown(fake_server: StartServer) -> None:
    """/metrics deltas between the scrapes give per-stage means for the run's requests."""
    url, _ = await fake_server(pdlb_metrics=True)
    res = await run(LoadConfig(url=url, rate=100, num_requests=10, scrape_metrics=True,
                               **SMALL))
    assert res.pdlb_stages is not None
    st = res.pdlb_stages["stages"]
    assert st["prefill"]["count"] == 10
    assert st["prefill"]["mean_ms"] == pytest.approx(FAKE_STAGE_SECONDS["prefill"] * 1000)
    assert st["decode"]["mean_ms"] == pytest.approx(30.0)
    assert "pdlb stages" in res.table()


async def test_stage_breakdown_skipped_without_metrics(fake_server: StartServer) -> None:
    """A target with no /metrics gives a note, not an error."""
    url, _ = await fake_server()
    res = await run(LoadConfig(url=url, rate=100, num_requests=2, scrape_metrics=True,
                               **SMALL))
    assert res.pdlb_stages is not None and res.pdlb_stages["stages"] == {}
    assert res.summary["completed"] == 2


async def test_preflight_failure_is_a_clear_error(fake_server: StartServer) -> None:
    """A server that answers 500 stops the run before time zero, quoting the error."""
    url, _ = await fake_server(fail_every=1)
    with pytest.raises(LoadgenError, match="HTTP 500"):
        await run(LoadConfig(url=url, rate=10, num_requests=2, **SMALL))


async def test_unreachable_server() -> None:
    """No server: an error naming the URL, not a traceback."""
    with pytest.raises(LoadgenError, match="cannot reach"):
        await run(LoadConfig(url="http://127.0.0.1:9", rate=10, num_requests=1, **SMALL))


async def test_progress_callback_and_stop(fake_server: StartServer) -> None:
    """Progress snapshots arrive; setting `stopping` ends a long run early."""
    url, _ = await fake_server()
    snaps: list[Progress] = []
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(1.3, stop.set)
    res = await run(LoadConfig(url=url, rate=50, duration_s=30, **SMALL),
                    progress=snaps.append, stopping=stop)
    assert snaps and snaps[-1].done > 0
    assert res.meta["interrupted"] is True
    assert res.summary["completed"] >= 30


async def test_write_load_recompute(fake_server: StartServer, tmp_path: Path) -> None:
    """JSON + JSONL round-trip; the summary recomputed from records is identical."""
    url, _ = await fake_server()
    res = await run(LoadConfig(url=url, rate=100, num_requests=10, slo=SLO(ttft_ms=1000),
                               label="a", api_key="sk-secret", **SMALL))
    jpath, rpath = res.write(tmp_path / "out" / "a.json")
    assert rpath is not None and rpath.name == "a.records.jsonl"
    raw = jpath.read_text()
    assert "sk-secret" not in raw
    data = orjson.loads(raw)
    assert data["schema"] == "pdlb.loadgen.result/1" and data["label"] == "a"
    back = RunResult.load(jpath)
    assert len(back.records) == 10
    again = back.recompute()
    assert again.summary == res.summary
    stricter = back.recompute(slo=SLO(ttft_ms=0.0001))
    assert stricter.summary["slo_attainment"] == 0.0


@pytest.mark.slow
async def test_workers_split_one_schedule(fake_server: StartServer) -> None:
    """Two processes send disjoint halves of the same absolute schedule; records merge."""
    url, _ = await fake_server()
    cfg = LoadConfig(url=url, rate=100, num_requests=40, workers=2, **SMALL)
    res = await run(cfg)
    assert res.summary["completed"] == 40
    assert sorted(r.index for r in res.records) == list(range(40))
    assert {r.worker for r in res.records} == {0, 1}
    single = await run(cfg.replace(workers=1))
    assert [r.scheduled for r in res.records] == pytest.approx(
        [r.scheduled for r in single.records])
    assert res.summary["schedule_lag_ms"]["p50"] < 250


async def test_setup_gc_is_done_before_time_zero(fake_server: StartServer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's full gc.collect() (several ms with a real heap on a busy machine) happens
    before time zero is fixed, so request 0 is not sent late by it."""
    import gc
    import time

    real_collect = gc.collect

    def slow_collect(*args: int) -> int:
        time.sleep(0.06)  # a slow full collection
        return real_collect(*args)

    monkeypatch.setattr(gc, "collect", slow_collect)
    url, _ = await fake_server()
    res = await run(LoadConfig(url=url, rate=20, arrival="constant", num_requests=3,
                               preflight=False, **SMALL))
    first = min(res.records, key=lambda r: r.scheduled)
    assert first.schedule_lag is not None and first.schedule_lag < 0.03  # was >= 0.055
