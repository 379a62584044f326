"""Metric formulas on hand-made timelines (vLLM bench serve definitions)."""

from __future__ import annotations

import math

import pytest

from loadgen.metrics import (
    SLO,
    asked_rate,
    itls,
    itls_per_token,
    meets_slo,
    peak_in_flight,
    percentile,
    stats,
    summarize,
    tpot,
)
from loadgen.records import Record


def rec(index: int, times: list[float], *, sent: float = 0.0, scheduled: float | None = None,
        out: int | None = None, tokens: list[int] | None = None, ok: bool = True,
        prompt: int | None = 10, finished: float | None = None, error: str | None = None,
        queue_wait: float = 0.0) -> Record:
    return Record(
        index=index, scheduled=sent if scheduled is None else scheduled, sent=sent,
        queue_wait=queue_wait, ok=ok, error=error, chunk_times=list(times), chunk_tokens=tokens,
        output_tokens=out if out is not None else (len(times) if ok else None),
        prompt_tokens=prompt if ok else None,
        finished=finished if finished is not None else (times[-1] if times else 0.01),
    )


def test_percentile_matches_numpy_linear() -> None:
    """Linear interpolation between order statistics, as numpy.percentile's default."""
    vals = [1.0, 2.0, 3.0, 4.0]
    assert percentile(vals, 50) == 2.5
    assert percentile(vals, 0) == 1.0
    assert percentile(vals, 100) == 4.0
    assert percentile(vals, 90) == pytest.approx(3.7)
    assert percentile([7.0], 99.9) == 7.0


def test_stats_empty_is_none_not_zero() -> None:
    """No values gives None statistics, never a reassuring 0."""
    s = stats([])
    assert s["count"] == 0 and s["mean"] is None and s["p99"] is None and s["max"] is None


def test_stats_keys_and_scaling() -> None:
    """Seconds in, milliseconds out; all the percentiles the schema promises."""
    s = stats([0.001, 0.002, 0.003])
    for key in ("count", "mean", "std", "min", "p50", "p90", "p95", "p99", "p99.9", "max"):
        assert key in s
    assert s["mean"] == pytest.approx(2.0)
    assert s["max"] == pytest.approx(3.0)


def test_single_token_chunks() -> None:
    """TTFT = first chunk; ITL = gaps; TPOT = (E2E - TTFT)/(n - 1); E2E = last chunk."""
    r = rec(0, [0.100, 0.110, 0.125, 0.130])
    assert r.ttft == pytest.approx(0.100)
    assert r.e2el == pytest.approx(0.130)
    assert itls(r) == pytest.approx([0.010, 0.015, 0.005])
    assert tpot(r) == pytest.approx(0.030 / 3)
    assert itls_per_token(r) == pytest.approx([0.010, 0.015, 0.005])


def test_chunks_carrying_several_tokens() -> None:
    """Bundled chunks: ITL per chunk is the raw gap, per token it is gap / tokens; TPOT
    divides by usage tokens - 1, not chunks - 1."""
    r = rec(0, [0.2, 0.24, 0.28], out=9, tokens=[1, 4, 4])
    assert itls(r) == pytest.approx([0.04, 0.04])
    assert itls_per_token(r) == pytest.approx([0.01, 0.01])
    assert tpot(r) == pytest.approx(0.08 / 8)
    s = summarize([r])
    assert s["itl_ms"]["mean"] == pytest.approx(40.0)
    assert s["itl_per_token_ms"]["mean"] == pytest.approx(10.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(10.0)
    assert s["total_output_tokens"] == 9


def test_per_token_itl_unknown_without_chunk_counts() -> None:
    """Without per-chunk usage and with chunks != tokens, per-token ITL is not guessed."""
    r = rec(0, [0.1, 0.2, 0.3], out=6, tokens=None)
    assert itls_per_token(r) is None
    s = summarize([r])
    assert s["itl_per_token_ms"]["count"] == 0
    assert s["itl_per_token_unavailable"] == 1


def test_one_token_request_left_out_of_tpot() -> None:
    """A one-token request has a TTFT and an E2E but no TPOT and no ITL."""
    one = rec(0, [0.05], out=1)
    two = rec(1, [0.05, 0.07], out=2)
    assert tpot(one) is None
    s = summarize([one, two])
    assert s["ttft_ms"]["count"] == 2
    assert s["tpot_ms"]["count"] == 1
    assert s["tpot_ms"]["mean"] == pytest.approx(20.0)
    assert s["itl_ms"]["count"] == 1


def test_failures_reported_apart_and_excluded_from_latency() -> None:
    """Failed requests do not enter latency percentiles; they are counted separately."""
    good = [rec(i, [0.01, 0.02], sent=i * 0.1) for i in range(4)]
    bad = [rec(9, [], sent=0.5, ok=False, error="HTTP 500: boom", finished=0.003)]
    s = summarize(good + bad)
    assert s["completed"] == 4 and s["failed"] == 1 and s["requests"] == 5
    assert s["ttft_ms"]["count"] == 4
    assert s["ttft_ms"]["max"] == pytest.approx(10.0)
    assert s["errors"] == {"HTTP 500: boom": 1}


def test_throughput_uses_usage_tokens_and_duration_from_records() -> None:
    """Duration runs from the first scheduled send to the last response end."""
    a = rec(0, [0.1, 0.2], sent=0.0, out=2, prompt=100, finished=0.25)
    b = rec(1, [0.1, 0.3], sent=1.0, out=3, prompt=50, finished=1.0)
    s = summarize([a, b])
    assert s["duration_s"] == pytest.approx(2.0)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(2.5)
    assert s["total_token_throughput"] == pytest.approx((150 + 5) / 2.0)


def test_goodput_and_attainment_count_failures_as_misses() -> None:
    """Goodput = good/duration; attainment = good / ALL requests (failures are misses)."""
    fast = [rec(i, [0.05, 0.06], sent=i * 0.5, finished=0.06) for i in range(3)]
    slow = rec(3, [0.50, 0.51], sent=1.5, finished=0.51)  # TTFT 500 ms > 100 ms
    failed = rec(4, [], sent=1.9, ok=False, error="timeout", finished=0.1)
    slo = SLO.parse("ttft:100")
    s = summarize([*fast, slow, failed], slo=slo, slo_target=0.6)
    assert s["good"] == 3
    assert s["slo_attainment"] == pytest.approx(3 / 5)
    assert s["slo_met"] is True
    assert s["goodput"] == pytest.approx(3 / s["duration_s"])
    s2 = summarize([*fast, slow, failed], slo=slo, slo_target=0.9)
    assert s2["slo_met"] is False


def test_meets_slo_each_limit() -> None:
    """Each limit is checked; a one-token request has TPOT 0 for goodput (vLLM)."""
    r = rec(0, [0.1, 0.2, 0.3])  # ttft 100, tpot 100, e2el 300
    assert meets_slo(r, SLO(ttft_ms=100, tpot_ms=100, e2el_ms=300))
    assert not meets_slo(r, SLO(ttft_ms=99))
    assert not meets_slo(r, SLO(tpot_ms=99))
    assert not meets_slo(r, SLO(e2el_ms=299))
    assert meets_slo(rec(1, [0.1], out=1), SLO(tpot_ms=0.001))
    assert not meets_slo(rec(2, [], ok=False), SLO(ttft_ms=1e9))


def test_slo_parse_forms_and_errors() -> None:
    """Comma, space and list forms; unknown names and bad values are refused by name."""
    assert SLO.parse("ttft:500,tpot:50") == SLO(ttft_ms=500, tpot_ms=50)
    assert SLO.parse(["ttft:500", "e2el:9000"]) == SLO(ttft_ms=500, e2el_ms=9000)
    with pytest.raises(ValueError, match="itl"):
        SLO.parse("itl:5")
    with pytest.raises(ValueError, match="not a number"):
        SLO.parse("ttft:fast")
    with pytest.raises(ValueError, match="> 0"):
        SLO.parse("ttft:0")


def test_schedule_lag_excludes_slot_wait_and_flags_falling_behind() -> None:
    """Lag = sent - scheduled - slot wait; a p99 over the limit marks the run loudly."""
    on_time = [rec(i, [0.01], sent=i * 0.01 + 0.001, scheduled=i * 0.01) for i in range(50)]
    s = summarize(on_time, max_lag_ms=5.0)
    assert s["schedule_lag_ms"]["max"] == pytest.approx(1.0)
    assert s["fell_behind"] is False and s["lag_warning"] is None
    waited = rec(99, [0.01], sent=1.0, scheduled=0.9, queue_wait=0.1)
    assert waited.schedule_lag == pytest.approx(0.0)
    late = [rec(i, [0.01], sent=i * 0.01 + 0.02, scheduled=i * 0.01) for i in range(50)]
    s2 = summarize(late, max_lag_ms=5.0)
    assert s2["fell_behind"] is True
    assert "FELL BEHIND" in s2["lag_warning"]


def test_offered_rate_is_the_asked_rate() -> None:
    """offered_rate is the rate asked for; the drawn schedule's rate and the send rate are
    reported beside it (a short Poisson run draws a schedule far from the asked rate)."""
    drawn = [rec(i, [0.01], sent=i * 0.1 + 0.001, scheduled=i * 0.1) for i in range(5)]
    s = summarize(drawn, asked_rate=5.0)
    assert s["offered_rate"] == 5.0
    assert s["scheduled_rate"] == pytest.approx(10.0)
    assert s["send_rate"] == pytest.approx(10.0)
    without = summarize(drawn)  # closed loop / trace replay: the schedule is what was offered
    assert without["offered_rate"] == pytest.approx(10.0)
    assert asked_rate(None, None) is None
    assert asked_rate(5, None) == 5.0
    assert asked_rate(2.0, 6.0) == 4.0


def test_ttft_from_scheduled_includes_queueing() -> None:
    """Under a concurrency cap, TTFT from the scheduled time shows the hidden wait."""
    r = rec(0, [0.05], sent=1.0, scheduled=0.7, queue_wait=0.3)
    s = summarize([r])
    assert s["ttft_ms"]["p50"] == pytest.approx(50.0)
    assert s["queue_wait_ms"]["p50"] == pytest.approx(300.0)
    assert s["ttft_from_scheduled_ms"]["p50"] == pytest.approx(350.0)


def test_peak_in_flight() -> None:
    """Sweep over [sent, sent + finished) intervals."""
    rs = [rec(0, [0.1], sent=0.0, finished=1.0), rec(1, [0.1], sent=0.5, finished=1.0),
          rec(2, [0.1], sent=1.0, finished=0.1)]
    assert peak_in_flight(rs) == 2


def test_summary_schema_keys() -> None:
    """The keys the docs promise are present, each latency an object with the stats."""
    s = summarize([rec(0, [0.1, 0.2])], slo=SLO(ttft_ms=500))
    for key in ("completed", "failed", "duration_s", "request_throughput", "output_throughput",
                "goodput", "slo_attainment"):
        assert key in s
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "schedule_lag_ms"):
        for sub in ("mean", "p50", "p90", "p99", "max"):
            assert sub in s[key]
    assert math.isfinite(s["duration_s"])
