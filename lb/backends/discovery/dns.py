"""DNS discovery: every A and AAAA record of a name (a headless Service) is a backend.

The name is re-resolved every ``interval_s`` with dnspython's asyncio resolver: it asks the
system's resolver configuration (/etc/resolv.conf, its search list included) or one given
``nameserver`` address and port, and it tells the answers apart that matter here:

- records → the set; NXDOMAIN (the name does not exist: a headless Service with no ready
  endpoint) or no record of a type → empty for that type: the server *answered*;
- a timeout, SERVFAIL, REFUSED, an unreachable server → :class:`DiscoveryError`: the runner
  keeps the last good set.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncGenerator

import dns.asyncresolver
import dns.exception
import dns.resolver

from lb.backends.discovery.source import DiscoveryError, Source
from lb.config import DnsDiscoveryConfig
from lb.errors import ConfigError


def backend_url(scheme: str, address: str, port: int) -> str:
    """``http://10.0.0.5:8000``, ``http://[fd00::5]:8000`` (the address in its short form)."""
    ip = ipaddress.ip_address(address)
    host = f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    return f"{scheme}://{host}:{port}"


class DnsSource(Source):
    def __init__(self, config: DnsDiscoveryConfig) -> None:
        self.config = config
        self.backoff_max_s = config.interval_s  # a failed resolution is retried sooner
        try:
            resolver = dns.asyncresolver.Resolver(configure=config.nameserver is None)
        except dns.resolver.NoResolverConfiguration as exc:
            raise ConfigError(f"discovery {config.source}: no DNS resolver configured ({exc});"
                              " give nameserver = \"ADDRESS[:PORT]\"") from None
        if config.nameserver is not None:
            resolver.nameservers = [config.nameserver[0]]
            resolver.port = config.nameserver[1]
        resolver.timeout = config.timeout_s
        resolver.lifetime = config.timeout_s
        self.resolver = resolver
        self._search = config.nameserver is None  # the system's search list, as getaddrinfo

    async def sets(self) -> AsyncGenerator[frozenset[str], None]:
        while True:
            yield await self.resolve()
            await asyncio.sleep(self.config.interval_s)

    async def resolve(self) -> frozenset[str]:
        """The name's addresses, as backend URLs; raises DiscoveryError when DNS fails."""
        answers = await asyncio.gather(self._addresses("A"), self._addresses("AAAA"),
                                       return_exceptions=True)
        urls: set[str] = set()
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
            urls.update(backend_url(self.config.scheme, a, self.config.port) for a in answer)
        return frozenset(urls)

    async def _addresses(self, rdtype: str) -> list[str]:
        name = self.config.name
        try:
            answer = await self.resolver.resolve(name, rdtype, search=self._search,
                                                 raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []  # the name does not exist: the server answered "nothing"
        except (dns.exception.DNSException, OSError) as exc:
            raise DiscoveryError(f"resolving {name} {rdtype}: {exc}") from None
        return [rdata.to_text() for rdata in answer] if answer.rrset is not None else []
