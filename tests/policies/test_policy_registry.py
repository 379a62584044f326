"""Start-up checks: every built-in is registered twice over, options are validated by name,
and a config naming a policy builds it (or fails at start-up, never per request)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from lb.config import parse_config
from lb.errors import ConfigError
from lb.serve.server import start_site
from policies.base import Policy
from policies.registry import BUILTINS, PolicyLoadError, available, build_policy

ROOT = Path(__file__).resolve().parents[2]


def test_every_builtin_is_in_pyproject_and_in_the_fallback():
    """pyproject's pdlb.policies entry points and registry.BUILTINS list the same policies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pdlb.policies"] == dict(BUILTINS)
    assert set(BUILTINS) == {"round_robin", "random", "least_requests", "least_tokens",
                             "power_of_two", "prefix_affinity", "session_affinity", "score"}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_builds_with_defaults(name):
    """Each built-in loads by name with no options and implements Policy."""
    assert name in available()
    assert isinstance(build_policy(name, {}, pool="prefill"), Policy)


@pytest.mark.parametrize("name, options, message", [
    ("random", {"seed": "x"}, "'seed' = 'x' has the wrong type"),
    ("power_of_two", {"seed": 1.5}, "'seed' = 1.5 has the wrong type"),
    ("least_requests", {"x": 1}, "unknown option 'x'"),
    ("least_tokens", {"kv_capacity_tokens": 0}, "'kv_capacity_tokens' = 0 is out of range"),
    ("least_tokens", {"max_scrape_age_s": True}, "'max_scrape_age_s' = True has the wrong"),
    ("prefix_affinity", {"load_factor": 0.5}, "'load_factor' = 0.5 is out of range"),
    ("prefix_affinity", {"max_entries": 0}, "'max_entries' = 0 is out of range"),
    ("prefix_affinity", {"holders": 2.0}, "'holders' = 2.0 has the wrong type"),
    ("prefix_affinity", {"load_slack_tokens": -1}, "'load_slack_tokens' = -1 is out of range"),
    ("prefix_affinity", {"min_match_blocks": 0}, "'min_match_blocks' = 0 is out of range"),
    ("session_affinity", {"header": " "}, "'header' must name a header"),
    ("session_affinity", {"max_sessions": 0}, "'max_sessions' = 0 is out of range"),
    ("score", {"weights": {"kv": 1}}, "unknown scorer 'kv'"),
    ("score", {"weights": 3}, "'weights' = 3 has the wrong type"),
])
def test_bad_options_name_the_pool_policy_and_option(name, options, message):
    """A bad option fails with the pool, the policy and the option in the message."""
    with pytest.raises(PolicyLoadError, match=f"pools.decode.policy_options: {name}: .*"):
        build_policy(name, options, pool="decode")
    with pytest.raises(PolicyLoadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_policy(name, options, pool="decode")


async def test_bad_policy_config_fails_at_start_up():
    """An unknown name in backends.toml stops pdlb from starting, listing what exists."""
    config = parse_config({"pools": {
        "prefill": {"backends": ["http://127.0.0.1:9"], "policy": "prefix_afinity"},
        "decode": {"backends": ["http://127.0.0.1:9"]}}, "server": {"port": 0}}, "b.toml")
    with pytest.raises(ConfigError, match=r"b.toml: pools.prefill.policy = 'prefix_afinity':"
                       r" unknown policy \(available: .*prefix_affinity.*\)"):
        await start_site(config)
