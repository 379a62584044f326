"""Reading one connector's ``[kv_transfer]`` table: known keys, types, per-backend tables.

Connector options live next to ``connector = "..."``; options that differ per backend live in
sub-tables keyed by the backend's URL, exactly as written in ``[pools.*]``::

    [kv_transfer]
    connector = "mooncake"
    bootstrap_port = 8998                        # default for every prefill

    [kv_transfer.backends."http://10.0.0.1:8100"]
    bootstrap_port = 9000                        # this prefill only

Every check happens when the connector is built (start-up, never per request); an error
names the key and the value, e.g. ``kv_transfer.backends."http://a:1".engine_id = 5:
expected a string``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lb.connectors.base import ConnectorOptionError
from policies.options import Kind, Options, kind_name, matches, toml_key


class ConnectorOptions:
    """The validated options of one connector (read through :class:`policies.options.Options`,
    the checker of every table in backends.toml).

    ``keys`` are the top-level options and their types; ``backend_keys`` the keys allowed in
    ``[kv_transfer.backends."URL"]`` (None: the connector takes no per-backend options).
    """

    def __init__(
        self,
        connector: str,
        options: Mapping[str, Any],
        keys: Mapping[str, Kind],
        backend_keys: Mapping[str, Kind] | None = None,
    ) -> None:
        self.connector = connector
        table = Options(options, "kv_transfer", owner=f"connector {connector!r}",
                        error=ConnectorOptionError)
        allowed = dict(keys)
        if backend_keys is not None:
            allowed["backends"] = dict
        table.check(allowed)
        self._table = table
        self._values = {k: v for k, v in options.items() if k != "backends"}
        self._backends: dict[str, dict[str, Any]] = {}
        backends = table.sub("backends")
        for url in backends:
            if not isinstance(backends[url], dict):
                raise backends.fail(url, "expected a table of options for that backend",
                                    show_value=False)
            backends.sub(url).check(backend_keys or {})
            self._backends[url.rstrip("/")] = dict(backends[url])

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def positive(self, key: str, default: float) -> float:
        value = self._values.get(key, default)
        if not value > 0:
            raise self._table.fail(key, "must be positive")
        return float(value)

    def backend(self, url: str) -> Mapping[str, Any]:
        """The per-backend table of ``url`` (empty when there is none)."""
        return self._backends.get(url.rstrip("/"), {})

    def backend_value(self, url: str, key: str, default: Any = None) -> Any:
        """``backends."url".key``, else the top-level ``key``, else ``default``."""
        return self.backend(url).get(key, self._values.get(key, default))

    def where(self, url: str, key: str) -> str:
        """The dotted path of ``key`` in ``url``'s per-backend table (for messages)."""
        return f"kv_transfer.backends.{toml_key(url)}.{toml_key(key)}"

    def check_urls(self, *pools: Iterable[str]) -> None:
        """Every ``[kv_transfer.backends."URL"]`` must name a backend of the given pools."""
        known = {u.rstrip("/") for pool in pools for u in pool}
        for url in self._backends:
            if url not in known:
                raise ConnectorOptionError(
                    f'kv_transfer.backends."{url}": no such backend in the pools this'
                    f" connector reads (a typo? known: {', '.join(sorted(known))})")


def check_value(where: str, value: Any, kind: Kind) -> Any:
    """A value resolved from several tables (per backend, then top level) is of ``kind``."""
    if not matches(value, kind):
        raise ConnectorOptionError(f"{where} = {value!r}: expected {kind_name(kind)}")
    return value


def check_port(where: str, value: Any) -> int:
    port: int = check_value(where, value, int)
    if not 0 < port < 65536:
        raise ConnectorOptionError(f"{where} = {value!r}: expected a TCP port (1-65535)")
    return port


def check_host_port(where: str, value: Any) -> str:
    """A ``host:port`` address (IPv6 as ``[::1]:port``)."""
    text: str = check_value(where, value, str)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConnectorOptionError(f"{where} = {value!r}: expected \"host:port\"")
    check_port(where, int(port))
    return text
