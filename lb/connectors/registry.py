"""Find connectors by name through the ``pdlb.connectors`` entry-point group."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from lb.connectors.base import Connector, ConnectorOptionError
from lb.errors import ConfigError

GROUP = "pdlb.connectors"
BUILTINS: Mapping[str, str] = {"nixl": "lb.connectors.nixl:NixlConnector"}


def available() -> dict[str, str]:
    found = dict(BUILTINS)
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def build_connector(name: str, options: Mapping[str, Any], source: str) -> Connector:
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
    return connector  # type: ignore[no-any-return]
