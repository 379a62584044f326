"""The one option checker: backends.toml's tables, connector options and policy options.

Every table pdlb reads — its own sections, ``[kv_transfer]`` for the connector,
``[pools.<pool>.policy_options]`` for a policy — goes through an :class:`Options`. A value is
type- and range-checked when it is read, :meth:`Options.done` refuses the keys nobody read
(a typo must not fall back to a default), and every error names where the value is written
(the file, when known, and the dotted key), the value and what was expected::

    backends.toml: server.port = 70000: must be <= 65535
    backends.toml: kv_transfer.bootstrap_port = '8998': expected an integer
    backends.toml: pools.decode.policy_options.load_factor = 0.5: must be >= 1
    backends.toml: server.prot: unknown key (known here: host, port, ...)

``Options`` is also a read-only mapping of the raw table, so a policy or connector factory
that receives one can treat it as the plain ``Mapping[str, Any]`` its signature promises.

It lives in ``policies`` because that package is the bottom layer: ``policies`` imports
nothing from ``lb`` (policies stay pure), and ``lb`` (config, connectors) builds on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

Kind = type | tuple[type, ...]
"""The type(s) a value may have, as for ``isinstance``; ``float`` accepts an int too, and
``int`` never accepts a TOML boolean."""

_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               dict: "a table", list: "an array"}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class OptionError(ValueError):
    """A bad option; the message names where it is written, its value and what was wrong."""

    located = False
    """True when raised by :class:`Options` (the message starts with the full key); False
    when a plugin raised it with a message of its own."""


def kind_name(kind: Kind) -> str:
    """``int`` → "an integer", ``(int, float)`` → "a number"."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        kinds = tuple(k for k in kinds if k is not int)
    return " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)


def matches(value: Any, kind: Kind) -> bool:
    """``isinstance`` with TOML's sense: true is not the integer 1; an int is a float."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, kinds)


def toml_key(name: str) -> str:
    """A key as TOML writes it in a dotted path: bare when it can be, else quoted."""
    return name if _BARE_KEY.fullmatch(name) else '"' + name.replace('"', '\\"') + '"'


_MISSING = object()


class Options(Mapping[str, Any]):
    """One table of options, checked as it is read.

    ``where`` is the table's dotted path (``"server"``, ``"kv_transfer"``,
    ``"pools.decode.policy_options"``); ``source`` the file, put in front of every message;
    ``owner`` names who reads the table (``"connector 'nixl'"``) in unknown-key messages;
    ``error`` is the exception class raised (an :class:`OptionError` subclass).
    """

    def __init__(
        self,
        table: Mapping[str, Any],
        where: str = "",
        *,
        source: str = "",
        owner: str = "",
        error: type[OptionError] = OptionError,
    ) -> None:
        self.table = table
        self.where = where
        self.source = source
        self.owner = owner
        self.error = error
        self.used: set[str] = set()

    # ---------------------------------------------------------------- the raw mapping
    def __getitem__(self, name: str) -> Any:
        return self.table[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)

    # ---------------------------------------------------------------- messages
    def key(self, name: str) -> str:
        """The dotted path of ``name`` in this table."""
        return f"{self.where}.{toml_key(name)}" if self.where else toml_key(name)

    def fail(self, name: str, why: str, *, show_value: bool = True) -> OptionError:
        """The error for option ``name``: its path, its value (when set) and ``why``."""
        value = self.table.get(name, _MISSING) if show_value else _MISSING
        shown = "" if value is _MISSING else f" = {value!r}"
        prefix = f"{self.source}: " if self.source else ""
        error = self.error(f"{prefix}{self.key(name)}{shown}: {why}")
        error.located = True
        return error

    # ---------------------------------------------------------------- typed reads
    def value(self, name: str, kind: Kind, default: Any = None) -> Any:
        """The value of ``name`` (``default`` when absent), which must be of ``kind``."""
        self.used.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        if not matches(value, kind):
            raise self.fail(name, f"expected {kind_name(kind)}")
        return value

    def number(self, name: str, default: float, *, minimum: float | None = None,
               maximum: float | None = None) -> float:
        """A number (an integer is accepted) within ``[minimum, maximum]``."""
        value = self.value(name, (int, float), default)
        return float(self._in_range(name, value, minimum, maximum))

    def integer(self, name: str, default: int, *, minimum: int | None = None,
                maximum: int | None = None) -> int:
        """An integer within ``[minimum, maximum]``."""
        value: int = self.value(name, int, default)
        return int(self._in_range(name, value, minimum, maximum))

    def optional_integer(self, name: str, *, minimum: int | None = None,
                         maximum: int | None = None) -> int | None:
        """An integer within ``[minimum, maximum]``, or None when absent."""
        if self.table.get(name) is None:
            self.used.add(name)
            return None
        return self.integer(name, 0, minimum=minimum, maximum=maximum)

    def choice(self, name: str, choices: Sequence[str], default: str) -> str:
        """One of ``choices``."""
        value: str = self.value(name, str, default)
        if value not in choices:
            raise self.fail(name, "expected " + _one_of(choices))
        return value

    def sub(self, name: str) -> Options:
        """The sub-table ``name`` (empty when absent), read with the same source and error."""
        table = self.value(name, dict, {})
        return Options(table, self.key(name), source=self.source, owner=self.owner,
                       error=self.error)

    def check(self, allowed: Mapping[str, Kind]) -> None:
        """Every key is one of ``allowed`` and of its kind (for tables read as a whole)."""
        for name in self.table:
            if name not in allowed:
                raise self._unknown(name, sorted(allowed))
            self.value(name, allowed[name])

    def accept(self, *names: str) -> None:
        """Mark keys as read elsewhere, so that :meth:`done` does not refuse them."""
        self.used.update(names)

    def done(self) -> None:
        """Refuse any key that was not read."""
        for name in self.table:
            if name not in self.used:
                raise self._unknown(name, sorted(self.used))

    def _unknown(self, name: str, known: Sequence[str]) -> OptionError:
        owner = f" for {self.owner}" if self.owner else ""
        return self.fail(name, f"unknown key{owner} (known here: {', '.join(known) or 'none'})",
                         show_value=False)

    def _in_range(self, name: str, value: float, minimum: float | None,
                  maximum: float | None) -> float:
        if value != value:  # NaN
            raise self.fail(name, "expected a number")
        if minimum is not None and value < minimum:
            raise self.fail(name, f"must be >= {minimum:g}")
        if maximum is not None and value > maximum:
            raise self.fail(name, f"must be <= {maximum:g}")
        return value


def _one_of(choices: Sequence[str]) -> str:
    quoted = [f'"{c}"' for c in choices]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
