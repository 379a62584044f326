"""Find connectors by name through the ``pdlb.connectors`` entry-point group, and check them.

Built-in names are reserved: :data:`BUILTINS` always wins over an installed entry point of
the same name (pdlb's own pyproject registers the built-ins under those names too), so
``connector = "nixl"`` means pdlb's NIXL connector whatever else is installed; a plugin that
reuses a built-in's name is ignored with a warning in the log — give it a name of its own.
Between two plugins of the same name, the first entry point found wins (also warned).
:data:`BUILTINS` also serves a checkout that was never pip-installed (no entry points).

Everything is checked when pdlb starts, never on a request: an unknown name lists the
available ones, a bad option is named (file, key, value), and an object that does not
implement :class:`~lb.connectors.base.Connector` is named with what it lacks.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

from lb.connectors.base import BackendRef, Connector, ConnectorBackendCheck, HandshakeMode
from lb.errors import ConfigError
from policies.options import OptionError

log = logging.getLogger("pdlb.connectors")

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
_METHODS = ("new_dispatch", "prefill_body", "accept_prefill", "decode_body")
_OLD_FLAGS = ("concurrent", "decode_first", "reusable_handoff")


def available() -> dict[str, str]:
    """Name → ``"module:attr"`` of every connector: the built-ins, then the plugins."""
    found = dict(BUILTINS)
    for ep in entry_points(group=GROUP):
        if ep.name not in found:
            found[ep.name] = ep.value
        elif ep.value != found[ep.name]:
            kind = "a built-in connector's" if ep.name in BUILTINS else "another plugin's"
            log.warning("connector entry point %s = %s is ignored: %r is %s name (%s)",
                        ep.name, ep.value, ep.name, kind, found[ep.name])
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
    target = registry[name]
    module_name, _, attr = target.partition(":")
    try:
        factory: Any = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:
        raise ConfigError(f"connector {name!r} ({target}): cannot load: {exc}") from exc
    try:
        connector = factory(dict(options))
    except OptionError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    _check_interface(name, target, connector)
    if isinstance(connector, ConnectorBackendCheck):
        try:
            connector.check_backends([BackendRef.of(u) for u in prefill],
                                     [BackendRef.of(u) for u in decode])
        except OptionError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return connector  # type: ignore[no-any-return]


def _check_interface(name: str, target: str, connector: Any) -> None:
    what = f"connector {name!r} ({target}) does not implement Connector:"
    for method in _METHODS:
        if not callable(getattr(connector, method, None)):
            raise ConfigError(f"{what} it has no {method}() method")
    if not isinstance(getattr(connector, "mode", None), HandshakeMode):
        old = [flag for flag in _OLD_FLAGS if hasattr(connector, flag)]
        hint = (f" (it sets {', '.join(old)}: those booleans were replaced by mode)"
                if old else "")
        raise ConfigError(
            f"{what} its 'mode' must be a lb.connectors.base.HandshakeMode{hint}")
