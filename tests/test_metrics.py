"""pdlb's lock-free Counter and Histogram (lb/metrics.py), read back through the exposition
text with prometheus_client's own parser: what a Prometheus server would see."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lb.metrics import Counter, Histogram, Metrics


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counter_children_and_unlabelled_counter() -> None:
    r = CollectorRegistry(auto_describe=False)
    requests = Counter("t_requests", "doc", ["endpoint", "status"], registry=r)
    plain = Counter("t_plain", "doc", registry=r)
    bound = requests.labels(endpoint="chat", status="200")
    bound.inc()
    bound.inc(2)
    assert requests.labels(status="200", endpoint="chat") is bound  # bind once, reuse
    requests.labels(endpoint="completions", status="429").inc()
    got = samples(r)
    assert got[("t_requests_total", (("endpoint", "chat"), ("status", "200")))] == 3
    assert got[("t_requests_total", (("endpoint", "completions"), ("status", "429")))] == 1
    assert got[("t_plain_total", ())] == 0  # exported before the first increment
    plain.inc()
    assert samples(r)[("t_plain_total", ())] == 1
    assert not any(name.endswith("_created") for name, _ in got)


def test_histogram_buckets_are_cumulative_and_le_inclusive() -> None:
    r = CollectorRegistry(auto_describe=False)
    h = Histogram("t_seconds", "doc", ["stage"], buckets=(0.1, 1.0, 10.0), registry=r)
    child = h.labels(stage="prefill")
    for value in (0.05, 0.1, 0.5, 1.0, 3.0, 50.0):
        child.observe(value)
    got = samples(r)
    labels = (("stage", "prefill"),)

    def bucket(le: str) -> float:
        return got[("t_seconds_bucket", (("le", le), *labels))]

    assert [bucket(le) for le in ("0.1", "1.0", "10.0", "+Inf")] == [2, 4, 5, 6]
    assert got[("t_seconds_count", labels)] == 6
    assert got[("t_seconds_sum", labels)] == pytest.approx(54.65)


def test_wrong_labels_are_refused() -> None:
    r = CollectorRegistry(auto_describe=False)
    c = Counter("t_c", "doc", ["a"], registry=r)
    with pytest.raises(ValueError):
        c.labels(b="x")
    with pytest.raises(ValueError):
        c.inc()  # a labelled counter has no series of its own
    h = Histogram("t_h", "doc", buckets=(1.0,), registry=r)
    with pytest.raises(ValueError):
        h.labels(a="x")


def test_app_metrics_render() -> None:
    m = Metrics()
    m.requests.labels(endpoint="completions", status="200").inc()
    m.prefill.observe(0.2)
    text = m.render().decode()
    assert 'pdlb_requests_total{endpoint="completions",status="200"} 1.0' in text
    assert 'pdlb_prefill_duration_seconds_bucket{le="0.25"} 1.0' in text
    assert "pdlb_usage_rewrites_total 0.0" in text
