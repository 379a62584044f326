"""The shape of lb/: wings whose imports run one way, and the doors that only one module opens.

``serve → proxy → stream → backends``: a module may import from its own wing and from the
wings after it, never from one before it; the shared concepts at lb/'s top (config, errors,
metrics, request, tokens, admission, prefix, connectors/) import no wing at all. The commands
(lb/cli.py, lb/tools/) sit above everything. Every import is checked, including those inside
functions and under ``TYPE_CHECKING``: the rule is about what a module knows, not about when
it loads it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

LB = Path(__file__).resolve().parent.parent / "lb"

# The order of the wings: a module may import its own rank or a lower one.
RANKS = {"serve": 3, "proxy": 2, "stream": 1, "backends": 0, "shared": -1}
COMMANDS = {"cli", "tools"}
HTTP1 = "lb.backends.http1"


def _module_name(path: Path) -> str:
    parts = path.relative_to(LB.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> list[tuple[str, Path]]:
    return sorted((_module_name(p), p) for p in LB.rglob("*.py"))


def _wing(module: str) -> str | None:
    """The wing of an lb module, "shared" for lb/'s top, None for the commands."""
    parts = module.split(".")
    if len(parts) < 2:
        return "shared"
    head = parts[1]
    if head in COMMANDS:
        return None
    if head in ("serve", "stream", "backends", "proxy"):
        return head
    if head in ("legs", "kvroute"):  # the proxy's own helpers: one attempt of one leg;
        return "proxy"               # token ids and KV-event lookups for a request
    return "shared"


def _imports(path: Path, module: str) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:  # `from lb.backends import http1` names a module too
                yield node.lineno, f"{target}.{alias.name}"


def _is(target: str, module: str) -> bool:
    return target == module or target.startswith(module + ".")


def _lb_target(target: str) -> str | None:
    """The lb module an import refers to (``from lb.x import Name`` → ``lb.x``), or None."""
    if not _is(target, "lb"):
        return None
    name = target
    while name.count(".") > 0 and not _exists(name):
        name = name.rpartition(".")[0]
    return name


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (LB.parent / rel.with_suffix(".py")).exists() or (LB.parent / rel / "__init__.py").exists()


MODULES = _modules()


def test_the_wings_exist() -> None:
    """The layout the architecture names: the wings and the journey at lb/'s top."""
    for wing in ("serve", "stream", "backends", "tools", "connectors"):
        assert (LB / wing / "__init__.py").exists(), wing
    assert (LB / "proxy.py").exists()
    assert len(MODULES) > 30, "the walk found too few modules: the test would prove nothing"


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_imports_run_one_way(module: str, path: Path) -> None:
    """No module imports from a wing before its own (serve → proxy → stream → backends)."""
    wing = _wing(module)
    if wing is None:
        return  # the commands use everything
    bad = []
    for line, target in _imports(path, module):
        lb_target = _lb_target(target)
        if lb_target is None or lb_target == "lb":
            continue
        their = _wing(lb_target)
        if their is None or RANKS[their] > RANKS[wing]:
            bad.append(f"line {line}: {lb_target} ({their or 'a command'})")
    assert not bad, f"{module} ({wing}) imports against the one-way rule: {sorted(set(bad))}"


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_only_upstream_knows_the_http1_client(module: str, path: Path) -> None:
    """The HTTP/1.1 client is reached only through the backends' facade."""
    if module in (HTTP1, "lb.backends.upstream") or _wing(module) is None:
        return
    users = [line for line, target in _imports(path, module) if _is(target, HTTP1)]
    assert not users, f"{module} imports {HTTP1} (lines {users}); go through lb.backends.upstream"


@pytest.mark.parametrize("module", ["lb.proxy", "lb.legs"])
def test_proxy_knows_no_http_library(module: str) -> None:
    """The journey talks to clients and backends only through the ports and the facade."""
    path = dict(MODULES)[module]
    targets = {t for _, t in _imports(path, module)}
    assert not any(_is(t, "aiohttp") for t in targets), f"{module} imports aiohttp"
    assert not any(_is(t, HTTP1) for t in targets), f"{module} imports the HTTP/1.1 client"


@pytest.mark.parametrize("module", [m for m, _ in MODULES if _wing(m) == "stream"])
def test_stream_knows_no_http_library(module: str) -> None:
    """The relay sees bytes and ports, not aiohttp's client or server objects."""
    path = dict(MODULES)[module]
    targets = {t for _, t in _imports(path, module)}
    assert not any(_is(t, "aiohttp") for t in targets), f"{module} imports aiohttp"


def test_http1_client_does_not_import_aiohttp() -> None:
    """pdlb's own HTTP/1.1 client stands alone: its errors are lb.errors, not aiohttp's."""
    path = LB / "backends" / "http1.py"
    targets = {t for _, t in _imports(path, HTTP1)}
    assert not any(_is(t, "aiohttp") for t in targets)


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a backends module importing the proxy is reported."""
    fake = tmp_path / "x.py"
    fake.write_text("from lb.proxy import Proxy\nimport lb.serve.front\n")
    targets = [_lb_target(t) for _, t in _imports(fake, "lb.backends.x")]
    wings = {_wing(t) for t in targets if t}
    assert wings == {"proxy", "serve"}
    assert all(RANKS[w] > RANKS["backends"] for w in wings if w)
