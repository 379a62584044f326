"""deploy/kubernetes/autoscaling/: the KEDA and HPA manifests scale StatefulSets that exist,
on a series pdlb exports with the labels they select; the [planner] section parses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lb.config import parse_config
from lb.errors import ConfigError
from lb.metrics import Metrics
from lb.planner import profile as profiles
from lb.planner.online import Recommender
from lb.planner.settings import PlannerConfig
from tests.test_deploy_manifests import K8S, k8s_objects

AUTOSCALING = K8S / "autoscaling"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((AUTOSCALING / name).read_text()) if d]


def _exported() -> str:
    metrics = Metrics()
    rec = Recommender(PlannerConfig(enabled=True, profile="x"), profiles.from_emulator(),
                      lambda pool: 2, lambda: 0)
    rec.export(metrics)
    return metrics.render().decode()


@pytest.mark.parametrize("name", ["keda.yaml", "hpa.yaml"])
def test_each_pool_scales_a_real_statefulset_on_its_own_series(name: str):
    """One object per pool; its target is that pool's StatefulSet in deploy/kubernetes; the
    series and label it reads are in pdlb's /metrics; desired = the recommendation."""
    objects = k8s_objects()
    exported = _exported()
    pools = set()
    for doc in _docs(name):
        ref = doc["spec"]["scaleTargetRef"]
        assert ref["kind"] == "StatefulSet" and ("StatefulSet", ref["name"]) in objects
        pool = ref["name"].removeprefix("vllm-")
        pools.add(pool)
        if doc["kind"] == "ScaledObject":
            assert doc["apiVersion"] == "keda.sh/v1alpha1"
            (trigger,) = doc["spec"]["triggers"]
            assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
            assert trigger["metadata"]["threshold"] == "1"
            series = re.fullmatch(r"sum\((\w+)\{pool=\"(\w+)\"\}\)",
                                  trigger["metadata"]["query"])
            assert series is not None
            metric, label = series.groups()
        else:
            assert doc["apiVersion"] == "autoscaling/v2"
            assert doc["kind"] == "HorizontalPodAutoscaler"
            (m,) = doc["spec"]["metrics"]
            assert m["type"] == "External"
            assert m["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
            metric = m["external"]["metric"]["name"]
            label = m["external"]["metric"]["selector"]["matchLabels"]["pool"]
        assert label == pool
        assert f'{metric}{{pool="{pool}"}} 2.0' in exported  # min(current, ...) at start
    assert pools == {"prefill", "decode"}


def test_the_planner_section_parses_and_refuses_bad_values(tmp_path: Path):
    """[planner] as docs/planner.md shows it; a missing profile or bad SLO is a config
    error naming the key."""
    prof = profiles.from_emulator().write(tmp_path / "profile.json")
    base = {"pools": {"prefill": {"backends": [{"url": "http://127.0.0.1:1"}]},
                      "decode": {"backends": [{"url": "http://127.0.0.1:2"}]}}}
    cfg = parse_config({**base, "planner": {"enabled": True, "profile": str(prof),
                                            "slo": "ttft:800,tpot:40", "percentile": 95}},
                       "<t>")
    assert cfg.planner.ttft_ms == 800 and cfg.planner.tpot_ms == 40
    assert cfg.planner.percentile == 95 and cfg.planner.enabled
    assert not parse_config(base, "<t>").planner.enabled
    with pytest.raises(ConfigError, match=r"planner\.profile"):
        parse_config({**base, "planner": {"enabled": True}}, "<t>")
    with pytest.raises(ConfigError, match=r"planner\.slo"):
        parse_config({**base, "planner": {"slo": "ttft:800"}}, "<t>")
    with pytest.raises(ConfigError, match=r"planner\.window"):
        parse_config({**base, "planner": {"window": 3}}, "<t>")


def test_pdlb_refuses_to_start_with_an_unreadable_profile(tmp_path: Path):
    """The profile is read when the app is built, before anything binds."""
    from lb.serve.app import create_app

    base = {"pools": {"prefill": {"backends": [{"url": "http://127.0.0.1:1"}]},
                      "decode": {"backends": [{"url": "http://127.0.0.1:2"}]}}}
    cfg = parse_config({**base, "planner": {"enabled": True,
                                            "profile": str(tmp_path / "none.json")}}, "<t>")
    with pytest.raises(ConfigError, match=r"planner.profile: .*none.json: cannot read"):
        create_app(cfg)
