"""The ``[pools.<pool>.discovery]`` tables, and what discovery relies on in pools and health
checks: added backends are pending until their first good check; a removed backend that
comes back while still finishing requests is the same object, counters and all."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lb.backends.health import HealthChecker
from lb.backends.pool import Pool
from lb.backends.upstream import Upstream
from lb.config import (
    BackendConfig,
    DnsDiscoveryConfig,
    HealthConfig,
    KubernetesDiscoveryConfig,
    TimeoutsConfig,
    load_config,
    parse_config,
)
from lb.errors import ConfigError
from lb.metrics import Metrics
from policies.registry import build_policy


def parse(prefill: dict[str, Any]) -> Any:
    return parse_config({"pools": {"prefill": prefill,
                                   "decode": {"backends": ["http://10.0.0.9:8000"]}}}, "<t>")


def test_dns_and_kubernetes_tables() -> None:
    """One table, or an array of them beside static backends, with every default."""
    config = parse({"discovery": {"kind": "dns", "name": "vllm.llm.svc.cluster.local.",
                                  "port": 8000}})
    assert config.prefill.backends == ()
    assert config.prefill.discovery == (DnsDiscoveryConfig(name="vllm.llm.svc.cluster.local.",
                                                           port=8000),)
    both = parse({"backends": ["http://10.0.0.1:8000"], "discovery": [
        {"kind": "dns", "name": "a.test", "port": 1, "interval_s": 1, "scheme": "https",
         "nameserver": "127.0.0.1:5353", "timeout_s": 0.5, "max_inflight_tokens": 100},
        {"kind": "kubernetes", "namespace": "llm", "selector": "llm-d.ai/role=prefill",
         "port_name": "http", "kubeconfig": "~/.kube/config", "context": "kind"}]})
    dns, kube = both.prefill.discovery
    assert dns == DnsDiscoveryConfig(name="a.test", port=1, interval_s=1.0, scheme="https",
                                     nameserver=("127.0.0.1", 5353), timeout_s=0.5,
                                     max_inflight_tokens=100)
    assert kube == KubernetesDiscoveryConfig(namespace="llm", selector="llm-d.ai/role=prefill",
                                             port_name="http", kubeconfig="~/.kube/config",
                                             context="kind")
    assert (dns.source, kube.source) == ("dns:a.test", "kubernetes:llm/llm-d.ai/role=prefill")
    ipv6 = parse({"discovery": {"kind": "dns", "name": "a", "port": 1, "nameserver": "[::1]:53"}})
    assert ipv6.prefill.discovery[0].nameserver == ("::1", 53)


@pytest.mark.parametrize(("table", "message"), [
    ({"kind": "consul"}, 'discovery.kind = \'consul\': expected "dns" or "kubernetes"'),
    ({"kind": "dns", "port": 1}, "discovery.name: give the name to resolve"),
    ({"kind": "dns", "name": "a"}, "discovery.port: give the backends' port"),
    ({"kind": "dns", "name": "a", "port": 1, "nameserver": "dns.google"},
     "nameserver = 'dns.google': expected an IP address"),
    ({"kind": "dns", "name": "a", "port": 1, "nameserver": "10.0.0.1:0"},
     "expected a port within 1..65535"),
    ({"kind": "dns", "name": "a", "port": 1, "selector": "x"}, "discovery.selector: unknown key"),
    ({"kind": "kubernetes", "selector": "a=b", "port": 1}, "discovery.namespace: give"),
    ({"kind": "kubernetes", "namespace": "n", "port": 1}, "discovery.selector: give"),
    ({"kind": "kubernetes", "namespace": "n", "selector": "a=b"},
     "discovery.port: give either port"),
    ({"kind": "kubernetes", "namespace": "n", "selector": "a=b", "port": 1, "port_name": "x"},
     "discovery.port: give either port"),
    ([{"kind": "dns", "name": "a", "port": 1}, {"kind": "dns", "name": "a", "port": 2}],
     "discovery[1]: the same source is listed twice (dns:a)"),
    ("dns", "discovery = 'dns': expected"),
])
def test_bad_tables_name_the_key(table: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"discovery": table})
    assert message in str(caught.value) and "pools.prefill" in str(caught.value)


def test_a_pool_needs_backends_or_discovery(tmp_path: Path) -> None:
    path = tmp_path / "backends.toml"
    path.write_text('[pools.prefill]\nbackends = []\n[pools.decode]\nbackends = ["http://a:1"]\n')
    with pytest.raises(ConfigError, match=r"or a \[pools.prefill.discovery\] table"):
        load_config(path)
    path.write_text('[pools.prefill.discovery]\nkind = "dns"\nname = "p.test"\nport = 8000\n'
                    '[pools.decode]\nbackends = ["http://a:1"]\n')
    assert load_config(path).prefill.discovery[0].name == "p.test"


def make_pool(urls: list[str]) -> Pool:
    config = parse({"backends": urls}).prefill
    return Pool(config, build_policy("round_robin", {}, pool="prefill"), Metrics())


def test_added_backends_are_pending_and_a_returning_one_keeps_its_counters() -> None:
    pool = make_pool(["http://10.0.0.1:1"])
    assert pool.backends[0].healthy and not pool.backends[0].pending  # start-up: as before
    two = replace(pool.config, backends=(BackendConfig("http://10.0.0.1:1"),
                                         BackendConfig("http://10.0.0.2:1")))
    added, _ = pool.replace_backends(two, pool.policy)
    new = pool.backends[1]
    assert added == ["http://10.0.0.2:1"] and new.pending and not new.usable()
    new.pending, new.healthy = False, True
    lease = pool.lease(new, 10).__enter__()
    one = replace(pool.config, backends=two.backends[:1])
    pool.replace_backends(one, pool.policy)
    assert pool.draining == {new.url: new}
    pool.replace_backends(two, pool.policy)  # back while its request runs
    assert pool.backends[1] is new and new.inflight_requests == 1 and new.pending
    lease.release()
    assert pool.inflight_requests == 0 and new.inflight_tokens == 0
    pool.replace_backends(one, pool.policy)
    pool.replace_backends(two, pool.policy)  # gone idle: a fresh one
    assert pool.backends[1] is not new and not pool.draining


class _Upstream(Upstream):
    """Every backend answers /health 200 and serves one model."""

    def __init__(self) -> None:
        super().__init__(TimeoutsConfig())

    async def get_text(self, url: str, *, timeout_s: float) -> tuple[int, str]:
        return 200, "ok"

    async def get_json(self, url: str, *, timeout_s: float) -> Any:
        return {"data": [{"id": "m"}]}


async def test_pending_backends_join_after_their_first_check_only() -> None:
    """A pending backend is checked at once (once the checker runs) and joins when its
    health and model checks pass; a real request's success does not make it join."""
    pool = make_pool(["http://10.0.0.1:1"])
    checker = HealthChecker(pool.backends, _Upstream(), HealthConfig(interval_s=60))
    await checker.first_round(1.0)
    checker.start(first_after_s=60)
    try:
        two = replace(pool.config, backends=(BackendConfig("http://10.0.0.1:1"),
                                             BackendConfig("http://10.0.0.2:1")))
        pool.replace_backends(two, pool.policy)
        new = pool.backends[1]
        checker.report_success(new)  # a proxy's report: not a health check
        assert new.pending and not new.healthy
        checker.set_backends(pool.backends)
        await checker.joined(1.0)
        assert new.healthy and not new.pending and new.models == frozenset({"m"})
    finally:
        await checker.stop()


def test_a_reload_whose_discovery_cannot_start_changes_nothing(tmp_path: Path) -> None:
    """A reload that adds a source pdlb cannot build (an unreadable kubeconfig) is refused
    whole: backends, sources and the static part stay as they were."""
    from lb.admission import Admission
    from lb.backends.discovery import Discovery
    from lb.serve.admin import apply_reload

    old = parse({"backends": ["http://10.0.0.1:1"],
                 "discovery": {"kind": "dns", "name": "a.test", "port": 1}})
    pools = {name: Pool(pc, build_policy(pc.policy, {}, pool=name), Metrics())
             for name, pc in old.pools.items()}
    discovery = Discovery(pools, lambda: None)
    before = dict(discovery.runners["prefill"])
    new = parse({"backends": ["http://10.0.0.2:1"], "discovery": [
        {"kind": "dns", "name": "a.test", "port": 1},
        {"kind": "kubernetes", "namespace": "n", "selector": "a=b", "port": 1,
         "kubeconfig": str(tmp_path / "missing")}]})
    with pytest.raises(ConfigError, match="cannot read the kubeconfig"):
        apply_reload(old, new, pools, [(Admission(old.pools, Metrics()), {"prefill": "prefill", "decode": "decode"})], lambda: None, discovery)
    assert [b.url for b in pools["prefill"].backends] == ["http://10.0.0.1:1"]
    assert discovery.runners["prefill"] == before
    assert discovery.static["prefill"] is old.prefill
