"""The ``[cluster]`` table: defaults, the password from the environment, and errors that
name the key."""

from __future__ import annotations

import pytest

from lb.config import ClusterConfig
from lb.errors import ConfigError
from tests.conftest import make_config

URLS = (["http://127.0.0.1:1"], ["http://127.0.0.1:2"])


def test_off_by_default() -> None:
    """No [cluster] table: no Redis."""
    assert make_config(*URLS).cluster == ClusterConfig()


def test_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """password_env names a variable; its value is the password."""
    monkeypatch.setenv("PDLB_TEST_REDIS_PW", "pw")
    config = make_config(*URLS, cluster={"redis_url": "redis://h:6379/0", "replicas": 3,
                                         "password_env": "PDLB_TEST_REDIS_PW", "tls": True})
    assert (config.cluster.password, config.cluster.replicas, config.cluster.tls) == (
        "pw", 3, True)


@pytest.mark.parametrize(("table", "message"), [
    ({"redis_url": "http://h:6379"}, "cluster.redis_url"),
    ({"redis_url": "redis://h", "password_env": "PDLB_TEST_UNSET_VAR"}, "cluster.password_env"),
    ({"redis_url": "redis://h", "replicas": 0}, "cluster.replicas"),
    ({"redis_url": "redis://h", "name": "a:b"}, "cluster.name"),
    ({"redis_url": "redis://h", "lease_ttl": 3}, "lease_ttl"),
])
def test_errors_name_the_key(table: dict[str, object], message: str) -> None:
    """A bad value or an unknown key is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        make_config(*URLS, cluster=table)
