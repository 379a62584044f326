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

Kind = type | tuple[type, ...]

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          dict: "a table"}


def _matches(value: Any, kind: Kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # TOML true is not the integer 1
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, kinds)


def _kind_name(kind: Kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_NAMES.get(k, k.__name__) for k in kinds)


class ConnectorOptions:
    """The validated options of one connector.

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
        allowed = dict(keys)
        if backend_keys is not None:
            allowed["backends"] = dict
        for key, value in options.items():
            if key not in allowed:
                known = ", ".join(sorted(allowed)) or "none"
                raise ConnectorOptionError(
                    f"kv_transfer.{key}: unknown option for connector {connector!r}"
                    f" (known: {known})")
            self._check(f"kv_transfer.{key}", value, allowed[key])
        self._values = {k: v for k, v in options.items() if k != "backends"}
        self._backends: dict[str, dict[str, Any]] = {}
        for url, table in dict(options.get("backends") or {}).items():
            where = f'kv_transfer.backends."{url}"'
            if not isinstance(table, dict):
                raise ConnectorOptionError(f"{where}: expected a table of options for that backend")
            for key, value in table.items():
                if backend_keys is None or key not in backend_keys:
                    known = ", ".join(sorted(backend_keys or {})) or "none"
                    raise ConnectorOptionError(
                        f"{where}.{key}: unknown per-backend option for connector"
                        f" {connector!r} (known: {known})")
                self._check(f"{where}.{key}", value, backend_keys[key])
            self._backends[url.rstrip("/")] = dict(table)

    @staticmethod
    def _check(where: str, value: Any, kind: Kind) -> None:
        if not _matches(value, kind):
            raise ConnectorOptionError(f"{where} = {value!r}: expected {_kind_name(kind)}")

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def positive(self, key: str, default: float) -> float:
        value = self._values.get(key, default)
        if not value > 0:
            raise ConnectorOptionError(f"kv_transfer.{key} = {value!r}: must be positive")
        return float(value)

    def backend(self, url: str) -> Mapping[str, Any]:
        """The per-backend table of ``url`` (empty when there is none)."""
        return self._backends.get(url.rstrip("/"), {})

    def backend_value(self, url: str, key: str, default: Any = None) -> Any:
        """``backends."url".key``, else the top-level ``key``, else ``default``."""
        return self.backend(url).get(key, self._values.get(key, default))

    def where(self, url: str, key: str) -> str:
        return f'kv_transfer.backends."{url}".{key}'

    def check_urls(self, *pools: Iterable[str]) -> None:
        """Every ``[kv_transfer.backends."URL"]`` must name a backend of the given pools."""
        known = {u.rstrip("/") for pool in pools for u in pool}
        for url in self._backends:
            if url not in known:
                raise ConnectorOptionError(
                    f'kv_transfer.backends."{url}": no such backend in the pools this'
                    f" connector reads (a typo? known: {', '.join(sorted(known))})")


def check_port(where: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise ConnectorOptionError(f"{where} = {value!r}: expected a TCP port (1-65535)")
    return value


def check_host_port(where: str, value: Any) -> str:
    """A ``host:port`` address (IPv6 as ``[::1]:port``)."""
    if not isinstance(value, str):
        raise ConnectorOptionError(f"{where} = {value!r}: expected \"host:port\"")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConnectorOptionError(f"{where} = {value!r}: expected \"host:port\"")
    check_port(where, int(port))
    return value
