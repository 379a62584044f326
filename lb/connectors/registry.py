"""Find connectors by name through the ``pdlb.connectors`` entry-point group.

:data:`BUILTINS` is the fallback for a checkout that was not pip-installed (no entry points);
an installed distribution's entry point of the same name wins, so a plugin can replace one.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

from lb.connectors.base import Connector, ConnectorBackendCheck, ConnectorOptionError
from lb.errors import ConfigError

GROUP = "pdlb.connectors"
BUILTINS: Mapping[str, str] = {
    "nixl": "lb.connectors.nixl:NixlConnector",
    "nixl_push": "lb.connectors.nixl_push:NixlPushConnector",
    "mooncake": "lb.connectors.mooncake:MooncakeConnector",
    "p2p_nccl": "lb.connectors.p2p_nccl:P2pNcclConnector",
    "sglang": "lb.connectors.sglang:SGLangConnector",
    "shared_storage": "lb.connectors.plain:SharedStorageConnector",
    "lmcache": "lb.connectors.plain:LMCacheConnector",
}


def available() -> dict[str, str]:
    found = dict(BUILTINS)
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def build_connector(
    name: str, options: Mapping[str, Any], source: str,
    prefill: Sequence[str] = (), decode: Sequence[str] = (),
) -> Connector:
    """Load, build and check connector ``name``; ``prefill``/``decode`` are the pools' URLs
    for connectors that check per-backend options (:class:`ConnectorBackendCheck`)."""
    registry = available()
    if name not in registry:
        raise ConfigError(
            f"{source}: kv_transfer.connector = {name!r}: unknown connector"
            f" (available: {', '.join(sorted(registry))})"
        )
    module_name, _, attr = registry[name].partition(":")
    try:
        factory: Any = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:
        raise ConfigError(f"connector {name!r} ({registry[name]}): cannot load: {exc}") from exc
    try:
        connector = factory(options)
    except ConnectorOptionError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    for method in ("new_dispatch", "prefill_body", "accept_prefill", "decode_body"):
        if not callable(getattr(connector, method, None)):
            raise ConfigError(
                f"connector {name!r} ({registry[name]}) does not implement Connector:"
                f" it has no {method}() method"
            )
    for flag in ("concurrent", "decode_first", "reusable_handoff"):
        if not isinstance(getattr(connector, flag, None), bool):
            raise ConfigError(
                f"connector {name!r} ({registry[name]}) does not implement Connector:"
                f" it has no boolean {flag!r} attribute"
            )
    if connector.concurrent and not connector.decode_first:
        raise ConfigError(
            f"connector {name!r} ({registry[name]}): a concurrent connector must set"
            " decode_first = True (both legs are chosen before either is sent)"
        )
    if isinstance(connector, ConnectorBackendCheck):
        try:
            connector.check_backends(prefill, decode)
        except ConnectorOptionError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return connector  # type: ignore[no-any-return]
