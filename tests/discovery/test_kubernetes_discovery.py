"""Kubernetes discovery against a small in-test API server (tests/discovery/fake_kube.py)
that speaks list + watch with resourceVersion: no cluster runs on these machines. Pods turn
Ready and unready, get deleted; watches end and resume; 410 Gone makes pdlb list again;
errors back off and keep the last good set; in-cluster auth over TLS with a rotated token."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lb.backends.discovery import kubeauth
from lb.backends.discovery import kubernetes as kube_module
from lb.backends.discovery.kubernetes import KubernetesSource, pod_url
from lb.backends.discovery.source import Runner
from lb.config import KubernetesDiscoveryConfig
from lb.errors import ConfigError
from lb.serve.app import DISCOVERY, POOLS
from tests.conftest import make_config
from tests.discovery.fake_kube import TOKEN, FakeKube, fake_kube, lists, pod, watches
from tests.discovery.support import complete, emulator, flowing, free_port, until, urls

A2, A3 = "127.0.0.2", "127.0.0.3"
SELECTOR = "llm-d.ai/role=prefill"


def kubeconfig(tmp_path: Path, server: str, token: str = TOKEN) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(f"""apiVersion: v1
kind: Config
current-context: test
contexts:
- name: test
  context: {{cluster: fake, user: pdlb, namespace: llm}}
clusters:
- name: fake
  cluster: {{server: "{server}"}}
users:
- name: pdlb
  user: {{token: {token}}}
""")
    return path


def kube_config(kubeconfig_path: Path, decode: list[str], **discovery: Any) -> Any:
    table = {"kind": "kubernetes", "namespace": "llm", "selector": SELECTOR,
             "port_name": "http", "kubeconfig": str(kubeconfig_path), "timeout_s": 2,
             "backoff_max_s": 0.2, **discovery}
    return make_config([], decode, pools={"prefill": {"discovery": table}},
                       health={"interval_s": 0.1, "timeout_s": 0.5})


def source_config(**changes: Any) -> KubernetesDiscoveryConfig:
    fields: dict[str, Any] = {"namespace": "llm", "selector": SELECTOR, "port": 8000,
                              "timeout_s": 2.0, "backoff_max_s": 0.2, **changes}
    return KubernetesDiscoveryConfig(**fields)


@contextlib.asynccontextmanager
async def running(source: KubernetesSource, **kwargs: Any) -> AsyncIterator[Runner]:
    """A runner on its own (no pdlb): its sets are read from ``runner.urls``."""
    runner = Runner("prefill", "test", "kubernetes", source, lambda _: None, **kwargs)
    runner.start()
    try:
        yield runner
    finally:
        await runner.stop()


async def test_pods_change_while_requests_flow(tmp_path: Path, start_pdlb: Any) -> None:
    """Through a real pdlb: an unready pod is not a backend; a Ready one is pending until its
    health check passes, then serves; a terminating pod (deletionTimestamp) leaves at once
    and finishes its in-flight request; no request fails."""
    port = free_port((A2, A3))
    async with fake_kube() as kube, emulator("decode") as d, \
            emulator("prefill", A2, port) as p2, \
            emulator("prefill", A3, port, unhealthy=True) as p3:
        await kube.put(pod("prefill-0", A2, port))
        await kube.put(pod("prefill-1", A3, port, ready=False))
        await kube.put(pod("other", "127.0.0.9", port, labels={"app": "other"}))
        url, app = await start_pdlb(kube_config(kubeconfig(tmp_path, kube.url), [d.url]))
        pool = app[POOLS]["prefill"]
        assert urls(pool) == [p2.url] and pool.backends[0].healthy
        assert kube.requests[0]["labelSelector"] == SELECTOR
        async with aiohttp.ClientSession() as http, flowing(http, url) as flow:
            await kube.update("prefill-1", ready=True)
            await until(lambda: p3.url in urls(pool), "the pod that turned Ready")
            new = next(b for b in pool.backends if b.url == p3.url)
            await flow.wait_for(20)
            assert new.pending and p3.engine.counters.requests_total == 0

            p2.engine.faults.extra_latency_ms = 2500.0
            slow = asyncio.create_task(complete(http, url, "slow one"))
            await until(lambda: pool.backends[0].inflight_requests > 0, "the slow request")
            p3.engine.faults.unhealthy = False
            await until(lambda: new.healthy and not new.pending, "the new pod joins")
            await until(lambda: p3.engine.counters.requests_total > 0, "it gets traffic")

            await kube.update("prefill-0", deleting=True)
            await until(lambda: urls(pool) == [p3.url], "the terminating pod removed")
            assert pool.draining[p2.url].inflight_requests > 0
            served = p2.engine.counters.requests_total
            assert await slow == 200
            await kube.delete("prefill-0")
            await flow.wait_for(10)
            assert p2.engine.counters.requests_total == served
        await kube.update("prefill-1", ready=False)  # the last one: the pool empties
        await until(lambda: urls(pool) == [], "the unready pod removed")
        await kube.update("prefill-1", ready=True)
        await until(lambda: urls(pool) == [p3.url], "Ready again")
        await until(lambda: pool.backends[0].healthy, "checked again")
        async with aiohttp.ClientSession() as http:
            assert await complete(http, url, "after") == 200
        runner = next(iter(app[DISCOVERY].runners["prefill"].values()))
        assert runner.errors == 0 and len(lists(kube)) == 1


async def test_watch_restarts_from_the_last_resource_version() -> None:
    """A watch that ends is resumed from the last resourceVersion it saw (bookmarks
    included), without a new list; changes made in between arrive."""
    async with fake_kube() as kube:
        await kube.put(pod("a", A2, 8000))
        access = kubeauth.ApiAccess(kube.url, token=TOKEN)
        async with running(KubernetesSource(source_config(), access)) as runner:
            await until(lambda: runner.urls == {f"http://{A2}:8000"}, "the list")
            await until(lambda: kube.watching == 1, "a watch")
            assert watches(kube)[0]["resourceVersion"] == str(kube.version)
            assert watches(kube)[0]["allowWatchBookmarks"] == "true"
            await kube.bookmark()
            await until(lambda: runner.source.details()["resource_version"] == str(kube.version),
                        "the bookmark's version")
            seen = kube.version
            await kube.end_watches()
            await kube.put(pod("b", A3, 8000))  # while no watch is open
            await until(lambda: len(watches(kube)) == 2, "a new watch")
            assert watches(kube)[1]["resourceVersion"] == str(seen)
            await until(lambda: runner.urls == {f"http://{A2}:8000", f"http://{A3}:8000"},
                        "the pod added between the watches")
            assert len(lists(kube)) == 1 and runner.errors == 0


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-status"])
async def test_gone_lists_again(as_http: bool) -> None:
    """410 Gone (as the ERROR event the API server sends, or as the HTTP status) on a
    resumed watch: pdlb lists again, and the list has what changed meanwhile."""
    async with fake_kube() as kube:
        kube.gone_as_http = as_http
        await kube.put(pod("a", A2, 8000))
        await kube.put(pod("b", A3, 8000))
        access = kubeauth.ApiAccess(kube.url, token=TOKEN)
        async with running(KubernetesSource(source_config(), access)) as runner:
            await until(lambda: runner.urls is not None and len(runner.urls) == 2, "the list")
            await until(lambda: kube.watching == 1, "a watch")
            await kube.end_watches()
            await kube.delete("a")
            kube.compact()
            await until(lambda: len(lists(kube)) == 2, "a second list after 410")
            await until(lambda: runner.urls == {f"http://{A3}:8000"}, "the deletion, by list")
            await until(lambda: kube.watching == 1, "watching again")
            assert watches(kube)[-1]["resourceVersion"] == str(kube.version)
            assert runner.errors == 0


async def test_a_server_that_always_answers_gone_is_not_hammered() -> None:
    """A server that answers 410 even to a watch from the list it just gave: lists and
    watches go on at most about once a second, not in a tight loop."""
    async with fake_kube() as kube:
        await kube.put(pod("a", A2, 8000))
        kube.compacted = 10**9
        access = kubeauth.ApiAccess(kube.url, token=TOKEN)
        async with running(KubernetesSource(source_config(), access)) as runner:
            await until(lambda: runner.urls is not None, "the list")
            await asyncio.sleep(1.5)
            assert 2 <= len(lists(kube)) <= 3 and runner.urls == {f"http://{A2}:8000"}


async def test_errors_back_off_and_keep_the_last_set(caplog: pytest.LogCaptureFixture) -> None:
    """API errors (500s) after a broken watch: counted, retried with a growing wait, the
    last set kept; logged once; then the watch resumes where it stopped."""
    async with fake_kube() as kube:
        await kube.put(pod("a", A2, 8000))
        access = kubeauth.ApiAccess(kube.url, token=TOKEN)
        config = source_config(backoff_max_s=1.0)
        async with running(KubernetesSource(config, access)) as runner:
            await until(lambda: kube.watching == 1, "a watch")
            kube.faults = [500, 503, 500]
            await kube.end_watches()
            await until(lambda: runner.errors == 3, "three failures")
            assert runner.urls == {f"http://{A2}:8000"}
            assert runner.status()["state"] == "failing"
            assert "answered 500: injected fault" in str(runner.last_error)
            await until(lambda: kube.watching == 1, "watching again")
            await until(lambda: runner.status()["state"] == "ok", "the source answers again")
        failed = [r for r in caplog.records
                  if r.name == "pdlb.discovery" and "failed" in r.getMessage()]
        assert len(failed) == 1
        assert len(lists(kube)) == 1  # resumed from its resourceVersion, no new list


async def test_backoff_doubles() -> None:
    """Tries after failures wait 0.5 s, 1 s, 2 s... up to backoff_max_s."""
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)
        await asyncio.sleep(0)

    async with fake_kube() as kube:
        kube.faults = [500] * 6
        access = kubeauth.ApiAccess(kube.url, token=TOKEN)
        source = KubernetesSource(source_config(backoff_max_s=3.0), access)
        async with running(source, sleep=sleep) as runner:
            await until(lambda: runner.urls is not None, "the list after the faults")
        assert slept[:6] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
        assert runner.errors == 6


async def test_wrong_token_is_an_error_that_names_the_answer() -> None:
    async with fake_kube() as kube:
        access = kubeauth.ApiAccess(kube.url, token="wrong")
        async with running(KubernetesSource(source_config(), access)) as runner:
            await until(lambda: runner.errors >= 1, "a failure")
            assert runner.urls is None and "401: Unauthorized" in str(runner.last_error)


async def test_list_pages_are_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube_module, "PAGE", 2)
    async with fake_kube() as kube:
        for i in range(5):
            await kube.put(pod(f"p{i}", f"10.0.0.{i + 1}", 8000))
        access = kubeauth.ApiAccess(kube.url, token=TOKEN)
        async with running(KubernetesSource(source_config(), access)) as runner:
            await until(lambda: runner.urls is not None, "the list")
            assert runner.urls == {f"http://10.0.0.{i + 1}:8000" for i in range(5)}
            assert [q.get("continue") for q in lists(kube)] == [None, "2", "4"]


def test_pod_url_rules() -> None:
    """Ready, with an IP, not terminating; port by number or by container port name."""
    by_name = source_config(port=None, port_name="http")
    assert pod_url(pod("a", "10.1.2.3", 8100), by_name) == "http://10.1.2.3:8100"
    assert pod_url(pod("a", "10.1.2.3", 8100), source_config()) == "http://10.1.2.3:8000"
    assert pod_url(pod("a", "fd00::1", 8100), by_name) == "http://[fd00::1]:8100"
    assert pod_url(pod("a", "10.1.2.3", 8100, ready=False), by_name) is None
    assert pod_url(pod("a", None, 8100), by_name) is None
    assert pod_url(pod("a", "10.1.2.3", 8100, port_name="grpc"), by_name) is None
    terminating = pod("a", "10.1.2.3", 8100)
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_url(terminating, by_name) is None
    https = source_config(scheme="https")
    assert pod_url(pod("a", "10.1.2.3", 1), https) == "https://10.1.2.3:8000"


def openssl_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=kubernetes", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


async def test_in_cluster_over_tls_with_a_rotated_token(tmp_path: Path) -> None:
    """In-cluster: KUBERNETES_SERVICE_HOST/PORT, the service account's CA and token; the
    token file is read again for each request (bound tokens rotate)."""
    cert, key = openssl_certificate(tmp_path)
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "ca.crt").write_bytes(cert.read_bytes())
    (account / "token").write_text(TOKEN + "\n")
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(cert, key)
    kube = FakeKube()
    await kube.start(server_ssl)
    try:
        await kube.put(pod("a", A2, 8000))
        port = kube.url.rsplit(":", 1)[1]
        access = kubeauth.in_cluster({"KUBERNETES_SERVICE_HOST": "127.0.0.1",
                                      "KUBERNETES_SERVICE_PORT": port}, account)
        assert access.server == f"https://127.0.0.1:{port}"
        async with running(KubernetesSource(source_config(), access)) as runner:
            await until(lambda: runner.urls == {f"http://{A2}:8000"}, "the list over TLS")
            await until(lambda: kube.watching == 1, "a watch")
            (account / "token").write_text("rotated")
            kube.token = "rotated"
            await kube.end_watches()
            await until(lambda: kube.watching == 1, "a watch with the new token")
            assert kube.tokens[-1] == "Bearer rotated" and runner.errors == 0
    finally:
        await kube.stop()


def test_in_cluster_outside_a_pod_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not running in a pod"):
        kubeauth.in_cluster({}, tmp_path)
    with pytest.raises(ConfigError, match="no service-account token"):
        kubeauth.in_cluster({"KUBERNETES_SERVICE_HOST": "10.0.0.1",
                             "KUBERNETES_SERVICE_PORT": "443"}, tmp_path)


def test_kubeconfig_reading(tmp_path: Path) -> None:
    """Context (current or named), relative token file, CA data, client certificate
    data; exec plugins and missing contexts refused with the file's name."""
    import base64

    cert, key = openssl_certificate(tmp_path)
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
    (tmp_path / "token").write_text("from-file\n")
    path = tmp_path / "config"
    path.write_text(f"""current-context: one
contexts:
- {{name: one, context: {{cluster: c1, user: token-file}}}}
- {{name: two, context: {{cluster: c2, user: cert}}}}
- {{name: three, context: {{cluster: c1, user: plugin}}}}
clusters:
- {{name: c1, cluster: {{server: "http://127.0.0.1:1/"}}}}
- {{name: c2, cluster: {{server: "https://127.0.0.1:2",
    certificate-authority-data: {b64(cert)}}}}}
users:
- {{name: token-file, user: {{tokenFile: token}}}}
- {{name: cert, user: {{client-certificate-data: {b64(cert)}, client-key-data: {b64(key)}}}}}
- {{name: plugin, user: {{exec: {{command: aws}}}}}}
""")
    one = kubeauth.from_kubeconfig(str(path))
    assert one.server == "http://127.0.0.1:1" and one.ssl is None
    assert one.headers() == {"Authorization": "Bearer from-file"}
    two = kubeauth.from_kubeconfig(str(path), "two")
    assert two.server == "https://127.0.0.1:2" and two.ssl is not None and two.headers() == {}
    with pytest.raises(ConfigError, match=r"uses exec, which pdlb does not support"):
        kubeauth.from_kubeconfig(str(path), "three")
    with pytest.raises(ConfigError, match=r"no context named 'four'"):
        kubeauth.from_kubeconfig(str(path), "four")
    with pytest.raises(ConfigError, match=r"cannot read the kubeconfig"):
        kubeauth.from_kubeconfig(str(tmp_path / "missing"))


async def test_unreadable_kubeconfig_stops_start_up(tmp_path: Path) -> None:
    """A kubeconfig pdlb cannot use is a start-up error (pdlb serve: one line, exit 2)."""
    from lb.serve.app import create_app

    with pytest.raises(ConfigError, match="cannot read the kubeconfig"):
        create_app(kube_config(tmp_path / "nope", ["http://127.0.0.1:1"]))
