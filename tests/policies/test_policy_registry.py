"""Start-up checks: every built-in is registered twice over, options are validated by name,
and a config naming a policy builds it (or fails at start-up, never per request)."""

from __future__ import annotations

import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from lb.config import parse_config
from lb.errors import ConfigError
from lb.serve.server import start_site
from policies import registry
from policies.base import Policy, PolicyOptionError
from policies.registry import BUILTINS, PolicyLoadError, available, build_policy
from policies.round_robin import RoundRobin

ROOT = Path(__file__).resolve().parents[2]


def test_every_builtin_is_in_pyproject_and_in_the_fallback():
    """pyproject's pdlb.policies entry points and registry.BUILTINS list the same policies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pdlb.policies"] == dict(BUILTINS)
    assert set(BUILTINS) == {"round_robin", "random", "least_requests", "least_tokens",
                             "power_of_two", "prefix_affinity", "session_affinity", "score",
                             "kv_aware"}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_builds_with_defaults(name):
    """Each built-in loads by name with no options and implements Policy."""
    assert name in available()
    assert isinstance(build_policy(name, {}, pool="prefill"), Policy)


@pytest.mark.parametrize("name, options, message", [
    ("random", {"seed": "x"}, "seed = 'x': expected an integer"),
    ("power_of_two", {"seed": 1.5}, "seed = 1.5: expected an integer"),
    ("least_requests", {"x": 1}, "x: unknown key for policy 'least_requests' (known here: none)"),
    ("least_tokens", {"kv_capacity_tokens": 0}, "kv_capacity_tokens = 0: must be >= 1"),
    ("least_tokens", {"max_scrape_age_s": True}, "max_scrape_age_s = True: expected a number"),
    ("prefix_affinity", {"load_factor": 0.5}, "load_factor = 0.5: must be >= 1"),
    ("prefix_affinity", {"max_entries": 0}, "max_entries = 0: must be >= 1"),
    ("prefix_affinity", {"holders": 2.0}, "holders = 2.0: expected an integer"),
    ("prefix_affinity", {"load_slack_tokens": -1}, "load_slack_tokens = -1: must be >= 0"),
    ("prefix_affinity", {"min_match_blocks": 0}, "min_match_blocks = 0: must be >= 1"),
    ("session_affinity", {"header": " "}, "header = ' ': must name a header"),
    ("session_affinity", {"max_sessions": 0}, "max_sessions = 0: must be >= 1"),
    ("score", {"weights": {"kv": 1}}, "weights.kv: unknown key for policy 'score'"),
    ("score", {"weights": 3}, "weights = 3: expected a table"),
])
def test_bad_options_name_the_pool_and_option(name, options, message):
    """A bad option fails naming its full key (pool, option) and its value, as the checker
    of backends.toml does."""
    with pytest.raises(PolicyLoadError) as info:
        build_policy(name, options, pool="decode")
    assert str(info.value).startswith("pools.decode.policy_options." + message)


def test_a_plugins_own_option_error_is_placed_in_its_table(monkeypatch):
    """A PolicyOptionError raised with a message of its own gets the table's path in front."""
    monkeypatch.setattr(registry, "BUILTINS", {**registry.BUILTINS, "picky": f"{__name__}:Picky"})
    with pytest.raises(PolicyLoadError, match=r"^pools\.prefill\.policy_options: picky says no$"):
        build_policy("picky", {}, pool="prefill")


class Picky:
    wants_prefix_hashes = False

    def __init__(self, options):
        raise PolicyOptionError("picky says no")

    def pick(self, request, candidates):
        return candidates[0]


async def test_bad_policy_config_fails_at_start_up():
    """An unknown name in backends.toml stops pdlb from starting, listing what exists."""
    config = parse_config({"pools": {
        "prefill": {"backends": ["http://127.0.0.1:9"], "policy": "prefix_afinity"},
        "decode": {"backends": ["http://127.0.0.1:9"]}}, "server": {"port": 0}}, "b.toml")
    with pytest.raises(ConfigError, match=r"b.toml: pools.prefill.policy = 'prefix_afinity':"
                       r" unknown policy \(available: .*prefix_affinity.*\)"):
        await start_site(config)


def test_a_plugin_cannot_take_a_builtins_name(monkeypatch, caplog):
    """Built-in names are reserved (as the registry's docstring says): an entry point named
    like a built-in is ignored with a warning; one with a new name is found."""
    plugins = [EntryPoint("round_robin", f"{__name__}:Picky", registry.GROUP),
               EntryPoint("round_robin", BUILTINS["round_robin"], registry.GROUP),  # pdlb's
               EntryPoint("picky", f"{__name__}:Picky", registry.GROUP)]
    monkeypatch.setattr(registry, "entry_points", lambda group: plugins)
    with caplog.at_level("WARNING", logger="pdlb.policies"):
        found = available()
    warned = [r.getMessage() for r in caplog.records]
    assert found["round_robin"] == BUILTINS["round_robin"] and found["picky"].endswith(":Picky")
    assert isinstance(build_policy("round_robin", {}, pool="prefill"), RoundRobin)
    assert len(warned) == 1 and "is ignored: 'round_robin' is a built-in policy's name" in warned[0]
