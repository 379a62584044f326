"""``[cluster] tls``: the budgets on a redis-server that speaks only TLS, its certificate
from a CA made for the test (``tls_ca_file``); without that CA the certificate is refused
and the replica runs on its local share."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from lb.backends.cluster import RedisBudgets
from lb.config import ClusterConfig
from lb.metrics import Metrics
from tests.cluster.redis_server import free_port, redis_binary


def make_certs(d: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl missing")
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "1", "-subj", "/CN=pdlb-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "srv.pem", "-days", "1", "-extfile", "ext")


def start_tls_redis(d: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [redis_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", "srv.pem", "--tls-key-file", "srv.key",
         "--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--dir", str(d)],
        cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_tls_with_the_servers_ca(tmp_path: Path) -> None:
    """With tls_ca_file the budgets are shared over TLS; without it, the replica falls
    back to its local share (no error, no hang)."""
    make_certs(tmp_path)
    port = free_port()
    proc = start_tls_redis(tmp_path, port)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        good = RedisBudgets(ClusterConfig(redis_url=url, tls=True, timeout_ms=500.0,
                                          tls_ca_file=str(tmp_path / "ca.pem")), Metrics())
        for _ in range(50):
            await good.start()
            if good.shared:
                break
            await good.stop()
            good = RedisBudgets(good.config, Metrics())
            await asyncio.sleep(0.1)
        assert good.shared
        assert await good.reserve({"decode": 10}, {"decode": 100}) is None
        assert good.global_used == {"decode": 10}
        plain = RedisBudgets(ClusterConfig(redis_url=url, tls=True, timeout_ms=500.0),
                             Metrics())
        await plain.start()
        assert not plain.shared  # the test CA is not among the system's
        await plain.stop()
        await good.stop()
    finally:
        proc.kill()
        proc.wait()
