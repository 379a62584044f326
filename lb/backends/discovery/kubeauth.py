"""How pdlb reaches the Kubernetes API server: in-cluster, or through a kubeconfig file.

Kept to what a load balancer in front of a fleet needs: a bearer token (a service account's
file is read again for every request: bound tokens are rotated about hourly), the cluster's
CA, or a client certificate. A kubeconfig's ``exec`` plugins, auth providers and basic auth
are refused at start-up with a message (run pdlb in the cluster, or give it a token).
Everything here runs at start-up; errors are :class:`ConfigError` naming the file and key.
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lb.backends.discovery.source import DiscoveryError
from lb.errors import ConfigError

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class ApiAccess:
    server: str
    """``https://host:port`` (no trailing slash)."""
    ssl: ssl.SSLContext | None = None
    """None for an ``http://`` server (a local proxy, the tests' API server)."""
    token: str | None = None
    token_file: Path | None = None

    def headers(self) -> dict[str, str]:
        """The Authorization header, the token file read now."""
        token = self.token
        if self.token_file is not None:
            try:
                token = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise DiscoveryError(f"cannot read the token {self.token_file}:"
                                     f" {exc.strerror}") from None
        return {"Authorization": f"Bearer {token}"} if token else {}


def in_cluster(env: Mapping[str, str] = os.environ,
               account: Path = SERVICE_ACCOUNT) -> ApiAccess:
    """The pod's own service account: ``KUBERNETES_SERVICE_HOST``/``_PORT``, its token
    and CA under /var/run/secrets/kubernetes.io/serviceaccount."""
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise ConfigError("kubernetes discovery: KUBERNETES_SERVICE_HOST/PORT are not set (pdlb"
                          " is not running in a pod); give kubeconfig = \"PATH\"")
    token = account / "token"
    if not token.is_file():
        raise ConfigError(f"kubernetes discovery: no service-account token at {token}"
                          " (automountServiceAccountToken: false?)")
    context = _context(f"{account / 'ca.crt'}", cafile=str(account / "ca.crt"))
    shown = f"[{host}]" if ":" in host else host
    return ApiAccess(f"https://{shown}:{port}", context, token_file=token)


def from_kubeconfig(path: str, context_name: str | None = None) -> ApiAccess:
    """A kubeconfig's cluster and user (its current-context unless ``context_name``)."""
    file = Path(path).expanduser()
    where = str(file)
    try:
        import yaml
    except ImportError:  # pragma: no cover - a dependency of pdlb[kubernetes] and the tests
        raise ConfigError(f"{where}: reading a kubeconfig needs PyYAML: pip install"
                          " 'pdlb[kubernetes]'") from None
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the kubeconfig: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not a valid kubeconfig: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{where}: not a kubeconfig (expected a mapping)")
    name = context_name or document.get("current-context")
    if not name:
        raise ConfigError(f"{where}: no current-context; give context = \"NAME\"")
    context = _named(document, "contexts", "context", name, where)
    cluster = _named(document, "clusters", "cluster", context.get("cluster"), where)
    user = (_named(document, "users", "user", context["user"], where)
            if context.get("user") else {})
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: cluster {context.get('cluster')!r}: server = {server!r}:"
                          " expected https://host:port")
    for unsupported in ("exec", "auth-provider", "username", "password"):
        if user.get(unsupported):
            raise ConfigError(f"{where}: user {context.get('user')!r} uses {unsupported}, which"
                              " pdlb does not support: give a token, tokenFile or a client"
                              " certificate (or run pdlb in the cluster)")
    base = file.parent
    ssl_context = None
    if server.startswith("https://"):
        ssl_context = _context(
            where, cafile=_path(base, cluster.get("certificate-authority")),
            cadata=_data(cluster.get("certificate-authority-data"), where),
            insecure=bool(cluster.get("insecure-skip-tls-verify")))
        _client_certificate(ssl_context, user, base, where)
    token = user.get("token")
    token_file = _path(base, user.get("tokenFile"))
    return ApiAccess(server.rstrip("/"), ssl_context, token=token if isinstance(token, str)
                     else None, token_file=Path(token_file) if token_file else None)


def _named(document: Mapping[str, Any], section: str, key: str, name: Any,
           where: str) -> dict[str, Any]:
    for entry in document.get(section) or ():
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(key)
            return value if isinstance(value, dict) else {}
    raise ConfigError(f"{where}: no {key} named {name!r} in {section}")


def _path(base: Path, value: Any) -> str | None:
    """A kubeconfig path: relative ones are relative to the kubeconfig's folder."""
    if not isinstance(value, str) or not value:
        return None
    return str(base / Path(value).expanduser())


def _data(value: Any, where: str) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return base64.b64decode(value, validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        raise ConfigError(f"{where}: a *-data entry is not base64 PEM") from None


def _context(where: str, *, cafile: str | None = None, cadata: str | None = None,
             insecure: bool = False) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=cafile, cadata=cadata)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: cannot load the cluster's CA: {exc}") from None
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _client_certificate(context: ssl.SSLContext, user: Mapping[str, Any], base: Path,
                        where: str) -> None:
    """``client-certificate``/``-key`` files, or their ``-data`` (written to a private
    temporary folder for the moment ssl loads them: it reads files only)."""
    cert_data = _data(user.get("client-certificate-data"), where)
    key_data = _data(user.get("client-key-data"), where)
    cert = _path(base, user.get("client-certificate"))
    key = _path(base, user.get("client-key"))
    if not (cert or cert_data):
        return
    try:
        with tempfile.TemporaryDirectory(prefix="pdlb-kube-") as folder:
            if cert_data:
                cert = os.path.join(folder, "client.crt")
                Path(cert).write_text(cert_data, encoding="ascii")
            if key_data:
                key = os.path.join(folder, "client.key")
                Path(key).write_text(key_data, encoding="ascii")
            assert cert is not None
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: cannot load the client certificate: {exc}") from None
