"""Find policies by name through the ``pdlb.policies`` entry-point group, and check them.

Everything is checked when pdlb starts: an unknown name lists the available ones, a plugin
that does not implement :class:`policies.base.Policy` is named with what it lacks, and a bad
option is named by the factory's :class:`PolicyOptionError`. Built-ins are registered through
pdlb's own pyproject like any plugin, with an in-code fallback so a source checkout that was
never pip-installed still finds them.

Built-in names are reserved: :data:`BUILTINS` always wins over an installed entry point of
the same name, so ``policy = "round_robin"`` means pdlb's own whatever else is installed; a
plugin that reuses a built-in's name is ignored with a warning in the log (between two
plugins of one name, the first entry point found wins, also warned). The connector registry
(lb/connectors/registry.py) does the same.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from policies.base import Policy, PolicyOptionError
from policies.options import OptionError, Options

log = logging.getLogger("pdlb.policies")

GROUP = "pdlb.policies"

BUILTINS: Mapping[str, str] = {
    "round_robin": "policies.round_robin:RoundRobin",
    "random": "policies.random_choice:RandomChoice",
    "least_requests": "policies.least_requests:LeastRequests",
    "least_tokens": "policies.least_tokens:LeastTokens",
    "power_of_two": "policies.power_of_two:PowerOfTwo",
    "prefix_affinity": "policies.prefix_affinity:PrefixAffinity",
    "session_affinity": "policies.session_affinity:SessionAffinity",
    "score": "policies.score:Score",
    "kv_aware": "policies.kv_aware:KVAware",
}


class PolicyLoadError(ValueError):
    """A policy could not be found, loaded, or built; the message says which and why."""


def available() -> dict[str, str]:
    """Name → ``"module:attr"`` of every policy: the built-ins, then the plugins."""
    found = dict(BUILTINS)
    for ep in entry_points(group=GROUP):
        if ep.name not in found:
            found[ep.name] = ep.value
        elif ep.value != found[ep.name]:
            kind = "a built-in policy's" if ep.name in BUILTINS else "another plugin's"
            log.warning("policy entry point %s = %s is ignored: %r is %s name (%s)",
                        ep.name, ep.value, ep.name, kind, found[ep.name])
    return found


def _load(name: str, target: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise PolicyLoadError(f"policy {name!r} ({target}): cannot load: {exc}") from exc
    return obj


def build_policy(name: str, options: Mapping[str, Any], *, pool: str) -> Policy:
    """Build the policy ``name`` for ``pool`` with its options, or raise PolicyLoadError."""
    registry = available()
    if name not in registry:
        raise PolicyLoadError(
            f"pools.{pool}.policy = {name!r}: unknown policy"
            f" (available: {', '.join(sorted(registry))})"
        )
    factory = _load(name, registry[name])
    if not callable(factory):
        raise PolicyLoadError(f"policy {name!r} ({registry[name]}) is not callable")
    table = Options(dict(options), f"pools.{pool}.policy_options", owner=f"policy {name!r}",
                    error=PolicyOptionError)
    try:
        policy = factory(table)
    except OptionError as exc:
        raise PolicyLoadError(str(exc) if exc.located else f"{table.where}: {exc}") from None
    except TypeError as exc:
        raise PolicyLoadError(
            f"policy {name!r} ({registry[name]}): its factory must accept one argument, the"
            f" options mapping: {exc}"
        ) from None
    pick = getattr(policy, "pick", None)
    if not callable(pick):
        raise PolicyLoadError(
            f"policy {name!r} ({registry[name]}) does not implement Policy: it has no pick() method"
        )
    if inspect.iscoroutinefunction(pick):
        raise PolicyLoadError(
            f"policy {name!r} ({registry[name]}): pick() must be synchronous (it runs on the"
            " event loop for every request); it is declared async"
        )
    try:
        inspect.signature(pick).bind(None, ())
    except TypeError:
        raise PolicyLoadError(
            f"policy {name!r} ({registry[name]}): pick() must take (request, candidates)"
        ) from None
    if not isinstance(getattr(policy, "wants_prefix_hashes", None), bool):
        raise PolicyLoadError(
            f"policy {name!r} ({registry[name]}) does not implement Policy: it has no boolean"
            " wants_prefix_hashes attribute (True: pdlb computes RouteRequest.prefix_hashes"
            " for it)"
        )
    return policy  # type: ignore[no-any-return]
