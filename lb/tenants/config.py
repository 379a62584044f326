"""``[tenancy]`` and ``[tenants.<name>]``: parsed once at start-up into frozen dataclasses.

Read through :class:`policies.options.Options` like every other table, so that a typo is an
error naming the file, the key and the value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from policies.options import Options

ANONYMOUS = "anonymous"
"""The tenant of requests that name no configured tenant (it may be configured too)."""
DEFAULT_CLASSES = ("interactive", "batch")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """One tenant's identity, share and limits (None: no limit)."""

    name: str
    api_keys: tuple[str, ...] = ()
    weight: float = 1.0
    """Its share of a saturated stage relative to the other tenants of the same class."""
    priority: str = DEFAULT_CLASSES[0]
    """Its class when the request asks for none."""
    priorities: tuple[str, ...] = ()
    """The classes its requests may ask for with ``[tenancy] priority_header``."""
    requests: int | None = None
    """Requests admitted per ``requests_window_s`` (any such window, sliding)."""
    requests_window_s: float = 1.0
    tokens: int | None = None
    """Tokens (prompt + max_tokens, trued up with the usage) per ``tokens_window_s``."""
    tokens_window_s: float = 60.0
    concurrent: int | None = None
    """Requests in flight at once."""

    @property
    def limited(self) -> bool:
        return self.requests is not None or self.tokens is not None or self.concurrent is not None


@dataclass(frozen=True, slots=True)
class TenancyConfig:
    """Everything about tenants; ``enabled`` only when at least one tenant is configured."""

    tenants: Mapping[str, TenantConfig] = field(default_factory=dict)
    header: str | None = None
    """A header naming the tenant, set by a trusted gateway in front (lower case)."""
    priority_header: str | None = "x-priority"
    """A header with which a request picks one of its tenant's ``priorities``."""
    classes: tuple[str, ...] = DEFAULT_CLASSES
    """Priority classes, highest first."""
    aging_s: float = 5.0
    """A waiting request rises one class per ``aging_s`` waited (bounded starvation)."""

    @property
    def enabled(self) -> bool:
        return bool(self.tenants)

    def tenant(self, name: str) -> TenantConfig:
        """A configured tenant, or the unlimited default for ``anonymous``."""
        found = self.tenants.get(name)
        return found if found is not None else TenantConfig(ANONYMOUS, priority=self.classes[0])

    @property
    def all_keys(self) -> tuple[str, ...]:
        return tuple(k for t in self.tenants.values() for k in t.api_keys)


def read_tenancy(root: Options) -> TenancyConfig:
    """``[tenancy]`` and ``[tenants.*]`` of the document ``root``."""
    ty = root.sub("tenancy")
    classes = ty.value("classes", list, list(DEFAULT_CLASSES))
    if not classes or not all(isinstance(c, str) and _NAME.fullmatch(c) for c in classes) \
            or len(set(classes)) != len(classes):
        raise ty.fail("classes", "expected a non-empty array of distinct names, highest first")
    header = ty.value("header", str, None)
    priority_header = ty.value("priority_header", str, "x-priority") or None  # "": none
    for name, value in (("header", header), ("priority_header", priority_header)):
        if value is not None and not re.fullmatch(r"[A-Za-z0-9-]{1,64}", value):
            raise ty.fail(name, "expected an HTTP header name")
    aging_s = ty.number("aging_s", 5.0, minimum=0.001)
    ty.done()

    tr = root.sub("tenants")
    tenants: dict[str, TenantConfig] = {}
    seen_keys: dict[str, str] = {}
    for name in list(tr.table):
        if not _NAME.fullmatch(name):
            raise tr.fail(name, "a tenant name is 1-64 letters, digits, '_', '.' or '-'",
                          show_value=False)
        t = tr.sub(name)
        keys = t.value("api_keys", list, [])
        if not all(isinstance(k, str) and k for k in keys):
            raise t.fail("api_keys", "expected an array of non-empty strings", show_value=False)
        for key in keys:
            if key in seen_keys:
                raise t.fail("api_keys", f"a key is also tenant {seen_keys[key]!r}'s",
                             show_value=False)
            seen_keys[key] = name
        priority = t.choice("priority", classes, classes[0])
        allowed = t.value("priorities", list, [priority])
        for c in allowed:
            if c not in classes:
                raise t.fail("priorities", f"{c!r} is not a class of [tenancy] classes {classes}")
        tenant = TenantConfig(
            name=name,
            api_keys=tuple(keys),
            weight=t.number("weight", 1.0, minimum=0.001),
            priority=priority,
            priorities=tuple(dict.fromkeys([priority, *allowed])),
            requests=t.optional_integer("requests", minimum=1),
            requests_window_s=t.number("requests_window_s", 1.0, minimum=0.01),
            tokens=t.optional_integer("tokens", minimum=1),
            tokens_window_s=t.number("tokens_window_s", 60.0, minimum=0.01),
            concurrent=t.optional_integer("concurrent", minimum=1),
        )
        t.done()
        tenants[name] = tenant
    tr.accept(*tenants)
    tr.done()
    return TenancyConfig(
        tenants=tenants,
        header=None if header is None else header.lower(),
        priority_header=None if priority_header is None else priority_header.lower(),
        classes=tuple(classes),
        aging_s=aging_s,
    )
