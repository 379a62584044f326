"""DNS discovery against a real DNS server: dnsmasq (Debian's package), started by the test on
a free loopback port, serving a hosts file the test rewrites (and SIGHUPs) while requests
flow through a real pdlb in front of emulators on 127.0.0.2, 127.0.0.3, ... Skipped when
dnsmasq is missing, unless PDLB_REQUIRE_DNSMASQ=1 (CI)."""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncresolver
import dns.exception
import pytest

from lb.serve.app import DISCOVERY, POOLS
from tests.conftest import make_config
from tests.discovery.support import complete, emulator, flowing, free_port, until, urls

NAME = "prefill.pdlb.test"
A2, A3, A4 = "127.0.0.2", "127.0.0.3", "127.0.0.4"


def dnsmasq_binary() -> str:
    found = shutil.which("dnsmasq") or next(
        (p for p in ("/usr/sbin/dnsmasq", "/sbin/dnsmasq") if os.access(p, os.X_OK)), None)
    if found is None:
        why = "dnsmasq is not installed (apt-get install dnsmasq-base; scripts/test does)"
        if os.environ.get("PDLB_REQUIRE_DNSMASQ") == "1":
            pytest.fail(f"{why}, and PDLB_REQUIRE_DNSMASQ=1")
        pytest.skip(why)
    return found


def free_udp_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
        with socket.socket() as tcp:  # dnsmasq listens on TCP too
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port for dnsmasq")


class Dnsmasq:
    """One dnsmasq serving ``*.test`` from a hosts file: authoritative for it (an unknown
    name is NXDOMAIN), nothing forwarded."""

    def __init__(self, folder: Path) -> None:
        self.hosts = folder / "hosts"
        self.log = folder / "dnsmasq.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False

    def write(self, *addresses: str, others: dict[str, str] | None = None) -> None:
        """The hosts file's new content: ``addresses`` for NAME, ``others`` name → address
        (written whole, then renamed into place)."""
        lines = [f"{a} {NAME}\n" for a in addresses]
        lines += [f"{a} {name}\n" for name, a in (others or {}).items()]
        tmp = self.hosts.with_suffix(".new")
        tmp.write_text("".join(lines))
        tmp.replace(self.hosts)

    def start(self) -> None:
        binary = dnsmasq_binary()
        self.port = free_udp_port()
        self.proc = subprocess.Popen(
            [binary, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
             "--no-hosts", f"--addn-hosts={self.hosts}", "--local=/test/",
             f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
             f"--user={getpass.getuser()}", "--pid-file", "--log-queries",
             f"--log-facility={self.log}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def change(self, *addresses: str) -> None:
        self.write(*addresses)
        self.signal(signal.SIGHUP)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig == signal.SIGSTOP:
            self.stopped = True
        elif sig == signal.SIGCONT:
            self.stopped = False

    def close(self) -> None:
        if self.proc is None:
            return
        if self.stopped:
            self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    async def answers(self, name: str = NAME) -> list[str]:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], self.port, 0.5
        answer = await resolver.resolve(name, "A", raise_on_no_answer=False)
        return sorted(r.to_text() for r in answer)


@pytest.fixture
async def dnsmasq(tmp_path: Path) -> AsyncIterator[Dnsmasq]:
    server = Dnsmasq(tmp_path)
    server.write(A2)
    server.start()
    try:
        for _ in range(100):  # until it answers
            try:
                if await server.answers() == [A2]:
                    break
            except dns.exception.DNSException:
                pass
            assert server.proc is not None
            if server.proc.poll() is not None:
                err = server.proc.stderr.read().decode() if server.proc.stderr else ""
                pytest.fail(f"dnsmasq exited {server.proc.returncode}: {err}")
            await asyncio.sleep(0.05)
        else:
            pytest.fail("dnsmasq never answered")
        yield server
    finally:
        server.close()


def dns_config(server: Dnsmasq, port: int, decode: list[str], prefill: list[str] | None = None,
               **extra: Any) -> Any:
    discovery = {"kind": "dns", "name": NAME, "port": port, "interval_s": 0.1,
                 "timeout_s": 0.3, "nameserver": f"127.0.0.1:{server.port}"}
    return make_config(prefill or [], decode, pools={"prefill": {"discovery": discovery}},
                       health={"interval_s": 0.1, "timeout_s": 0.5}, **extra)


async def test_records_change_while_requests_flow(dnsmasq: Dnsmasq, start_pdlb: Any) -> None:
    """Records added and removed while requests flow: none fails; a new backend is pending
    (no traffic) until its first health check passes; a removed one finishes its in-flight
    request and gets no new one."""
    port = free_port((A2, A3))
    async with emulator("decode") as d, emulator("prefill", A2, port) as p2, \
            emulator("prefill", A3, port, unhealthy=True) as p3:
        url, app = await start_pdlb(dns_config(dnsmasq, port, [d.url]))
        pool = app[POOLS]["prefill"]
        assert urls(pool) == [p2.url] and pool.backends[0].healthy  # found before listening
        async with aiohttp.ClientSession() as http, flowing(http, url) as flow:
            await flow.wait_for(10)
            dnsmasq.change(A2, A3)
            await until(lambda: p3.url in urls(pool), "127.0.0.3 discovered")
            new = next(b for b in pool.backends if b.url == p3.url)
            assert new.pending and not new.healthy
            await flow.wait_for(20)  # health checks keep failing: it stays out
            assert new.pending and p3.engine.counters.requests_total == 0

            p2.engine.faults.extra_latency_ms = 2500.0  # a slow request to keep in flight
            slow = asyncio.create_task(complete(http, url, "slow one"))
            await until(lambda: pool.backends[0].inflight_requests > 0, "the slow request")
            p3.engine.faults.unhealthy = False
            await until(lambda: new.healthy, "127.0.0.3 joins after its first good check")
            assert not new.pending
            await until(lambda: p3.engine.counters.requests_total > 0, "127.0.0.3 gets traffic")

            dnsmasq.change(A3)
            await until(lambda: urls(pool) == [p3.url], "127.0.0.2 removed")
            draining = pool.draining[p2.url]
            assert draining.inflight_requests > 0  # removed, still finishing the slow one
            served_by_removed = p2.engine.counters.requests_total
            assert await slow == 200
            await flow.wait_for(20)
            assert p2.engine.counters.requests_total == served_by_removed
            await until(lambda: draining.inflight_requests == 0, "the removed one drained")
        assert pool.inflight_requests == 0
        runner = next(iter(app[DISCOVERY].runners["prefill"].values()))
        assert runner.errors == 0 and runner.updates == 3


async def test_silent_dns_server_keeps_the_last_set(dnsmasq: Dnsmasq, start_pdlb: Any,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A DNS server that stops answering (SIGSTOP): the pool keeps its last set, requests
    keep flowing, every failed try is counted (in /metrics too) and logged once; once it
    answers again, a change made meanwhile is applied."""
    caplog.set_level(logging.INFO, logger="pdlb.discovery")
    port = free_port((A2, A3))
    dnsmasq.change(A2, A3)
    await until_answers(dnsmasq, [A2, A3])
    async with emulator("decode") as d, emulator("prefill", A2, port) as p2, \
            emulator("prefill", A3, port) as p3:
        url, app = await start_pdlb(dns_config(dnsmasq, port, [d.url]))
        pool = app[POOLS]["prefill"]
        runner = next(iter(app[DISCOVERY].runners["prefill"].values()))
        assert urls(pool) == [p2.url, p3.url]
        async with aiohttp.ClientSession() as http, flowing(http, url) as flow:
            dnsmasq.signal(signal.SIGSTOP)
            await until(lambda: runner.errors >= 3, "three failed resolutions")
            assert urls(pool) == [p2.url, p3.url] and runner.status()["state"] == "failing"
            await flow.wait_for(10)
            async with http.get(url + "/metrics") as r:
                text = await r.text()
            labels = f'pool="prefill",source="dns:{NAME}"'
            assert f"pdlb_discovery_backends{{{labels}}} 2.0" in text
            errors = next(line for line in text.splitlines()
                          if line.startswith(f"pdlb_discovery_errors_total{{{labels}}}"))
            assert float(errors.rsplit(" ", 1)[1]) >= 3

            dnsmasq.write(A3)
            dnsmasq.signal(signal.SIGCONT)
            dnsmasq.signal(signal.SIGHUP)
            await until(lambda: urls(pool) == [p3.url], "the change made while silent")
            assert runner.status()["state"] == "ok"
            await flow.wait_for(10)
        failed = [r for r in caplog.records
                  if r.name == "pdlb.discovery" and "failed" in r.getMessage()]
        assert len(failed) == 1 and failed[0].levelname == "WARNING", failed
        assert "keeping its last 2 backend(s)" in failed[0].getMessage()
        assert any("answers again" in r.getMessage() for r in caplog.records)


async def until_answers(server: Dnsmasq, expected: list[str]) -> None:
    for _ in range(100):
        if await server.answers() == expected:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"dnsmasq never answered {expected}")


async def test_nxdomain_is_an_empty_set_beside_static_backends(
        dnsmasq: Dnsmasq, start_pdlb: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A name that no longer exists (NXDOMAIN: a headless Service with no ready pod) is an
    answer, not a failure: the discovered backends leave, the static one stays and serves."""
    caplog.set_level(logging.INFO, logger="pdlb.discovery")
    port = free_port((A2,))
    async with emulator("decode") as d, emulator("prefill", A2, port) as p2, \
            emulator("prefill", "127.0.0.1", 0) as static:
        url, app = await start_pdlb(dns_config(dnsmasq, port, [d.url], prefill=[static.url]))
        pool = app[POOLS]["prefill"]
        runner = next(iter(app[DISCOVERY].runners["prefill"].values()))
        assert urls(pool) == [static.url, p2.url]
        async with aiohttp.ClientSession() as http, flowing(http, url) as flow:
            dnsmasq.change()  # no record at all: NXDOMAIN
            await until(lambda: urls(pool) == [static.url], "the discovered one removed")
            await flow.wait_for(10)
            dnsmasq.change(A2)
            await until(lambda: urls(pool) == [static.url, p2.url], "back")
            await until(lambda: pool.backends[1].healthy, "back in rotation")
            await flow.wait_for(10)
        assert runner.errors == 0 and runner.updates == 3
        assert any("answered with no backends" in r.getMessage() for r in caplog.records)


async def test_reload_keeps_discovered_backends(dnsmasq: Dnsmasq, tmp_path: Path) -> None:
    """POST /admin/reload with discovery on: the file's static part changes, the discovered
    backends stay (their counters too); a changed discovery table starts its source again;
    /admin/state shows each source."""
    from lb.config import load_config
    from lb.serve.server import start_site

    port = free_port((A2, A4))
    path = tmp_path / "backends.toml"

    def write(decode: list[str], name: str) -> None:
        path.write_text(
            "[pools.prefill.discovery]\n"
            f'kind = "dns"\nname = "{name}"\nport = {port}\ninterval_s = 0.1\n'
            f'timeout_s = 0.3\nnameserver = "127.0.0.1:{dnsmasq.port}"\n'
            "[pools.decode]\nbackends = [" + ", ".join(f'"{u}"' for u in decode) + "]\n"
            '[server]\nport = 0\n[health]\ninterval_s = 0.1\ntimeout_s = 0.5\n'
            '[admin]\nenabled = true\ntoken = "t"\n')

    auth = {"Authorization": "Bearer t"}
    async with emulator("decode") as d1, emulator("decode") as d2, \
            emulator("prefill", A2, port) as p2, emulator("prefill", A4, port) as p4:
        write([d1.url], NAME)
        runner, url = await start_site(load_config(path), drain_s=1.0,
                                       reloader=lambda: load_config(path))
        try:
            pool = runner.app[POOLS]["prefill"]
            kept = pool.backends[0]
            async with aiohttp.ClientSession() as http:
                assert await complete(http, url, "before") == 200
                write([d1.url, d2.url], NAME)
                async with http.post(url + "/admin/reload", headers=auth) as r:
                    report = await r.json()
                assert report["pools"]["prefill"] == {"added": [], "removed": [],
                                                      "backends": [p2.url]}
                assert report["pools"]["decode"]["added"] == [d2.url]
                assert pool.backends[0] is kept
                assert runner.app[POOLS]["decode"].backends[1].healthy  # checked before the answer

                dnsmasq.write(A2, others={"other.pdlb.test": A4})
                dnsmasq.signal(signal.SIGHUP)
                write([d1.url, d2.url], "other.pdlb.test")
                async with http.post(url + "/admin/reload", headers=auth) as r:
                    assert r.status == 200
                await until(lambda: urls(pool) == [p4.url], "the new name's backend")
                await until(lambda: pool.backends[0].healthy, "it joins")
                assert await complete(http, url, "after") == 200
                async with http.get(url + "/admin/state", headers=auth) as r:
                    state = await r.json()
            sources = state["pools"]["prefill"]["discovery"]
            assert [(s["source"], s["state"], s["backends"]) for s in sources] == [
                ("dns:other.pdlb.test", "ok", [p4.url])]
            assert state["pools"]["prefill"]["backends"][0]["pending"] is False
            assert "discovery" not in state["pools"]["decode"]
        finally:
            await runner.cleanup()
