"""The aiohttp application: routes, the guard's middleware, and the app's shared resources.

Nothing is global: :func:`create_app` builds every object from the config and hangs it on
the app under typed keys; the client session and background tasks live in ``cleanup_ctx``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from lb.admission import Admission
from lb.backends import local_budgets
from lb.backends.cluster import RedisBudgets
from lb.backends.discovery import Discovery
from lb.backends.health import HealthChecker
from lb.backends.kvevents import KVEvents
from lb.backends.local_budgets import WorkerBudgets
from lb.backends.pool import Pool
from lb.backends.scrape import LoadScraper
from lb.backends.shared_loads import SharedLoads
from lb.backends.shared_sessions import SharedSessions
from lb.backends.upstream import Upstream
from lb.config import Config
from lb.connectors.base import BackendRef, Connector, ConnectorStartup
from lb.connectors.registry import build_connector
from lb.errors import ConfigError, InvalidRequest, NotFound, PdlbError
from lb.metrics import Metrics
from lb.proxy import Proxy
from lb.request import Endpoint
from lb.serve.admin import Reloader, admin_routes, apply_reload, state
from lb.serve.aiohttpside import AiohttpSide
from lb.serve.guard import ErrorAnswer, Guard, error_answer, internal_error
from lb.serve.models import ModelGroup, ModelRouter
from lb.serve.passthrough import PassThrough
from lb.serve.routes import GUARDED_PATHS, ROUTES
from lb.serve.workers import Siblings, merge_metrics
from lb.tenants.gate import Tenants
from lb.tokens import PromptTokenizer, make_counter
from lb.tracing import make_tracing
from policies.registry import PolicyLoadError, build_policy

log = logging.getLogger("pdlb.app")

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
POOLS = web.AppKey("pools", dict)
UPSTREAM = web.AppKey("upstream", Upstream)
PROXY = web.AppKey("proxy", Proxy)
"""The first model group's proxy (the top-level pools' when configured)."""
ROUTER = web.AppKey("router", ModelRouter)
"""Request → model group (lb/serve/models.py): what the fronts call."""
HEALTH = web.AppKey("health", HealthChecker)
MODELS_CACHE = web.AppKey("models_cache", list)
GUARD = web.AppKey("guard", Guard)
RELOAD: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("reload")
ADMIN_APP = web.AppKey("admin_app", web.Application)
SIBLINGS = web.AppKey("siblings", Siblings)
"""Under ``pdlb serve --workers N``: the other workers, whose metrics /metrics merges."""
DRAINING = web.AppKey("draining", asyncio.Event)
KV_EVENTS: web.AppKey[KVEvents | None] = web.AppKey("kv_events")
"""The KV-event subscribers and each pool's block index (None unless ``[kv_events]`` is on);
each pool's index is also ``pool.kv`` for the request path."""
DISCOVERY = web.AppKey("discovery", Discovery)
"""Each pool's discovery sources (none unless a pool has a ``discovery`` table)."""
"""Set when pdlb stops taking new work (SIGTERM/SIGINT): /health/ready answers 503."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, content_type="application/json",
        headers=headers,
    )


def _error_response(answer: ErrorAnswer) -> web.Response:
    response = web.Response(body=answer.body, status=answer.status,
                            content_type="application/json", headers=answer.headers or None)
    if answer.close:
        response.force_close()
    return response


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The guard's access check for every route but the completions and the pass-through
    routes (their handlers run the whole guard, as the fast front does), and every failure
    as an OpenAI-shaped JSON error with the right status."""
    guard = request.app[GUARD]
    try:
        if request.method != "POST" or request.path not in GUARDED_PATHS:
            guard.check_access(request.path, request.headers.get("Authorization"))
        return await handler(request)
    except PdlbError as exc:
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        return _error_response(error_answer(exc))
    except web.HTTPNotFound:
        return _error_response(error_answer(NotFound(
            f"no route for {request.method} {request.path}", code="unknown_route")))
    except web.HTTPMethodNotAllowed as exc:
        return _error_response(error_answer(_MethodNotAllowed(
            f"method {exc.method} not allowed on {request.path}", exc.allowed_methods)))
    except web.HTTPException as exc:
        kind = InvalidRequest if exc.status < 500 else PdlbError
        return _error_response(error_answer(kind(exc.reason, status=exc.status)))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error_response(error_answer(internal_error()))


class _MethodNotAllowed(InvalidRequest):
    """405, with the ``Allow`` header RFC 9110 asks for."""

    def __init__(self, message: str, allowed: set[str]) -> None:
        super().__init__(message, status=405, code="method_not_allowed")
        self.allowed = ", ".join(sorted(allowed))

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allowed}


def _completion_handler(endpoint: Endpoint) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        guard = request.app[GUARD]
        client = AiohttpSide(request, guard)
        await guard.serve(client, endpoint)
        assert client.response is not None  # the guard answers when the proxy does not
        return client.response

    return handle


def _pool_status(pools: dict[str, Pool]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Usable and listed backends per pool, and the pools without a usable one."""
    status = {
        name: {
            "usable_backends": sum(1 for b in pool.backends if b.healthy),
            "backends": len(pool.backends),
        }
        for name, pool in pools.items()
    }
    return status, [name for name, s in status.items() if s["usable_backends"] == 0]


def _pools_answer(pools: dict[str, Pool], up: str, down_status: str) -> web.Response:
    """200 ``up`` when each pool has a usable backend; else 503 naming the pools without."""
    status, down = _pool_status(pools)
    if down:
        return _json(503, {"status": down_status,
                           "reason": f"no usable backend in pool(s): {', '.join(down)}",
                           "pools": status})
    return _json(200, {"status": up, "pools": status})


async def health(request: web.Request) -> web.Response:
    """200 when each pool has a usable backend; 503 naming the pools that have none."""
    return _pools_answer(request.app[POOLS], "ok", "unavailable")


async def health_live(request: web.Request) -> web.Response:
    """Liveness: 200 whenever the event loop runs this handler (backends do not matter:
    restarting pdlb would not bring them back)."""
    return _json(200, {"status": "live"})


async def health_ready(request: web.Request) -> web.Response:
    """Readiness: 200 when each pool has a usable backend and pdlb is not draining; else
    503 with the reason."""
    if request.app[DRAINING].is_set():
        return _json(503, {"status": "not_ready", "reason": "draining: pdlb is shutting down"})
    return _pools_answer(request.app[POOLS], "ready", "not_ready")


async def models(request: web.Request) -> web.Response:
    """The union of the models every pool's backends serve, as they list them (``root``,
    ``parent`` and ``owned_by`` kept: a LoRA adapter's parent is its base model), plus each
    ``[models]`` name and alias as a card of its own (lb/serve/models.py); cached for one health
    interval (at most 5 s)."""
    cache: list[Any] = request.app[MODELS_CACHE]
    now = time.monotonic()
    if cache and now - cache[0] < min(5.0, request.app[CONFIG].health.interval_s):
        return _json(200, cache[1])
    upstream = request.app[UPSTREAM]
    pools: dict[str, Pool] = request.app[POOLS]
    backends = sorted((b for pool in pools.values() for b in pool.backends if b.healthy),
                      key=lambda b: not b.pool_name.endswith("decode"))
    timeout = request.app[CONFIG].health.timeout_s * 2

    async def fetch(url: str) -> Any:
        try:
            return await upstream.get_json(url + "/v1/models", timeout_s=timeout)
        except PdlbError:
            return None

    answers = await asyncio.gather(*(fetch(b.url) for b in backends))
    seen: dict[str, Any] = {}
    for answer in answers:
        if isinstance(answer, dict) and isinstance(answer.get("data"), list):
            for model in answer["data"]:
                if isinstance(model, dict) and isinstance(model.get("id"), str):
                    seen.setdefault(model["id"], model)
    if not seen:
        raise PdlbError("no backend answered /v1/models", status=503,
                        code="backends_unavailable")
    payload = {"object": "list", "data": request.app[ROUTER].listing(seen)}
    cache[:] = [now, payload]
    return _json(200, payload)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """This process's metrics; under ``--workers N`` every worker's, labelled ``worker``."""
    own = request.app[METRICS].render()
    siblings = request.app.get(SIBLINGS)
    if siblings is not None:
        upstream = request.app[UPSTREAM]
        timeout = request.app[CONFIG].health.timeout_s
        others = siblings.others()

        async def fetch(url: str) -> str | None:
            try:
                status, text = await upstream.get_text(url, timeout_s=timeout)
            except PdlbError:
                return None
            return text if status == 200 else None

        answers = await asyncio.gather(*(fetch(url) for url in others.values()))
        texts = {i: t for i, t in zip(others, answers, strict=True) if t is not None}
        texts[siblings.index] = own.decode()
        own = merge_metrics(texts)
    return web.Response(
        body=own, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


async def own_metrics(request: web.Request) -> web.Response:
    """A worker's own metrics, on its private port (read by its siblings' /metrics)."""
    return web.Response(
        body=request.app[METRICS].render(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


def auto_budgets(pools: dict[str, Pool], admission: Admission) -> None:
    """``max_inflight_tokens = "auto"``: budget = KV capacity the healthy backends report."""
    for name, pool in pools.items():
        if pool.config.auto_budget:
            capacities = [b.load.kv_capacity_tokens for b in pool.backends
                          if b.healthy and b.load is not None and b.load.kv_capacity_tokens]
            admission.set_limit(name, sum(c for c in capacities if c) or None)


def _first_answer_s(config: Config) -> float:
    """How long start-up waits for the discovery sources' first answers (each source's own
    timeout, plus a second for a Kubernetes list's pages)."""
    limits = [d.timeout_s + 1.0 for pool in config.pools.values() for d in pool.discovery]
    return max(limits, default=0.0)


def group_configs(config: Config) -> list[tuple[str, str | None, Config]]:
    """(name, served name, the group's own view of the config) per model group: the
    top-level pools first (name ""), then each ``[models]`` model with its pools under the
    ``prefill``/``decode`` keys the proxy reads, its own connector and tokenizer when given.
    The concurrency limit is the router's (lb/serve/models.py), across groups."""
    server = dataclasses.replace(config.server, max_concurrent_requests=None)
    out: list[tuple[str, str | None, Config]] = []
    if config.has_default_pools:
        out.append(("", None, dataclasses.replace(
            config, pools={"prefill": config.pools["prefill"],
                           "decode": config.pools["decode"]}, server=server)))
    for model in config.models.values():
        out.append((model.name, model.served_name, dataclasses.replace(
            config, server=server,
            pools={"prefill": config.pools[model.prefill_pool],
                   "decode": config.pools[model.decode_pool]},
            kv_transfer=model.kv_transfer or config.kv_transfer,
            tokenizer=model.tokenizer or config.tokenizer)))
    return out


def create_app(config: Config, reloader: Reloader | None = None) -> web.Application:
    """Build the pdlb application from a validated config (raises ConfigError at start-up).

    ``reloader`` re-reads the configuration for hot reloads (SIGHUP, POST /admin/reload).
    """
    metrics = Metrics()
    pools: dict[str, Pool] = {}
    for name, pool_config in config.pools.items():
        try:
            policy = build_policy(pool_config.policy, pool_config.policy_options, pool=name)
        except PolicyLoadError as exc:
            raise ConfigError(f"{config.source}: {exc}") from None
        pools[name] = Pool(pool_config, policy, metrics)
    upstream = Upstream(config.server.timeouts, fast=config.server.fast_stream)
    budgets = (RedisBudgets(config.cluster, metrics) if config.cluster.redis_url is not None
               else None)
    siblings = Siblings.from_env()
    specs = group_configs(config)
    if len(specs) > 1 and budgets is None and siblings is not None:
        raise ConfigError(f"{config.source}: several model groups ([models] beside [pools], or"
                          " more than one [models] table) cannot yet share budgets across"
                          " workers (--workers) without [cluster]: give a [cluster] redis_url,"
                          " or run one pdlb process per host")
    # --workers N without [cluster]: the workers share the budgets through one file, which
    # the parent made (missing: an error at start-up, never a worker alone on the whole).
    worker_budgets = (WorkerBudgets(siblings.folder / local_budgets.FILE_NAME, siblings.index)
                      if budgets is None and siblings is not None else None)
    # One tenant registry for every model group: a tenant's limits hold across models.
    tenants = Tenants(config.tenancy, metrics, budgets) if config.tenancy.enabled else None
    all_backends = [b for pool in pools.values() for b in pool.backends]
    checker = HealthChecker(all_backends, upstream, config.health)
    tracing = make_tracing(config.tracing)
    sessions = (SharedSessions(budgets, config.cluster.session_ttl_s)
                if budgets is not None and config.cluster.share_sessions else None)
    groups: list[ModelGroup] = []
    admissions: list[tuple[Admission, dict[str, str]]] = []
    connectors: list[tuple[Connector, dict[str, Pool]]] = []
    for name, served, group_config in specs:
        group_pools = {leg: pools[p.name] for leg, p in group_config.pools.items()}
        connector = build_connector(group_config.kv_transfer.connector,
                                    group_config.kv_transfer.options, config.source,
                                    prefill=[b.url for b in group_config.prefill.backends],
                                    decode=[b.url for b in group_config.decode.backends])
        tokenizer = PromptTokenizer(make_counter(group_config.tokenizer),
                                    group_config.tokenizer.offload_chars)
        admission = Admission(group_config.pools, metrics, budgets or worker_budgets,
                              config.tenancy)
        admissions.append((admission, {leg: p.name for leg, p in group_config.pools.items()}))
        connectors.append((connector, group_pools))
        proxy = Proxy(group_config, group_pools, admission, upstream, connector, tokenizer,
                      metrics, checker, tracing, sessions, tenants)
        groups.append(ModelGroup(name, served, group_pools, proxy))
    router = ModelRouter(config, groups, metrics)
    proxy = router.proxy
    admission = proxy.admission

    def all_auto_budgets() -> None:
        for group_admission, names in admissions:
            auto_budgets({leg: pools[p] for leg, p in names.items()}, group_admission)

    loads = (SharedLoads(budgets, pools, config.cluster.load_interval_ms / 1000)
             if budgets is not None and config.cluster.share_loads else None)
    scraper = LoadScraper(all_backends, upstream, config.scrape.interval_s,
                          config.scrape.timeout_s, all_auto_budgets)

    kv_events = None
    if config.kv_events.enabled:
        kv_events = KVEvents(config.kv_events,
                             lambda url: upstream.get_json(url, timeout_s=config.health.timeout_s))
        for name, pool in pools.items():
            pool.kv = kv_events.pool(name)
        metrics.registry.register(kv_events.collector())

    guard = Guard(config, router, metrics)
    planner = None
    if config.planner.enabled:
        from lb.planner.online import attach

        if len(groups) > 1:
            raise ConfigError(f"{config.source}: [planner] recommends replicas for one model"
                              " group; this configuration has several ([models])")
        planner = attach(config.planner, metrics, dict(groups[0].pools))
        guard.observer = planner.observe
    passthrough = PassThrough(config, pools, upstream, checker, metrics, guard, router)
    app = web.Application(middlewares=[guard_middleware],
                          client_max_size=config.server.max_body_bytes)
    app[GUARD] = guard
    app[CONFIG] = config
    app[METRICS] = metrics
    app[POOLS] = pools
    app[UPSTREAM] = upstream
    app[PROXY] = proxy
    app[ROUTER] = router
    app[HEALTH] = checker
    app[MODELS_CACHE] = []
    app[DRAINING] = asyncio.Event()
    app[KV_EVENTS] = kv_events
    current = [config]

    def rebuild_all() -> None:
        backends = [b for pool in pools.values() for b in pool.backends]
        checker.set_backends(backends)
        scraper.set_backends(backends)
        if kv_events is not None:
            kv_events.follow({name: pool.backends for name, pool in pools.items()})

    discovery = Discovery(pools, rebuild_all)  # builds each source: ConfigError at start-up
    app[DISCOVERY] = discovery
    metrics.registry.register(discovery.collector())

    def reload() -> dict[str, Any]:
        if reloader is None:
            raise ConfigError("this pdlb was started without a config file; nothing to reload")
        new = reloader()
        report = apply_reload(current[0], new, pools, admissions, rebuild_all, discovery)
        current[0] = new
        return report

    app[RELOAD] = reload
    if config.admin.enabled and config.admin.token:
        admin = admin_routes(config.admin.token, reload,
                             lambda: state(pools, admission, kv_events, discovery, budgets),
                             proxy.kv.lookup,
                             lambda: checker.joined(2 * config.health.timeout_s))
        if config.admin.port is None:
            app.router.add_routes(admin)
        else:
            admin_app = web.Application(middlewares=[guard_middleware])
            admin_app[GUARD] = guard
            admin_app.router.add_routes(admin)
            app[ADMIN_APP] = admin_app

    async def resources(app: web.Application) -> AsyncIterator[None]:
        if budgets is not None:
            await budgets.start()  # bounded by [cluster] timeout_ms; Redis down is no error
        if worker_budgets is not None:
            await worker_budgets.start()
        await upstream.start()
        # Each source's first answer before the first health round, so that it checks them.
        await discovery.start(_first_answer_s(config))
        startups = [(c, p) for c, p in connectors if isinstance(c, ConnectorStartup)]
        try:
            for connector, group_pools in startups:
                assert isinstance(connector, ConnectorStartup)
                await connector.start(
                    [BackendRef.of(b.url) for b in group_pools["prefill"].backends],
                    [BackendRef.of(b.url) for b in group_pools["decode"].backends],
                    lambda url: upstream.get_json(url, timeout_s=config.health.timeout_s))
        except BaseException:
            await discovery.stop()
            await upstream.close()
            if budgets is not None:
                await budgets.stop()  # the caller reports the error (pdlb serve: exit 2)
            if worker_budgets is not None:
                await worker_budgets.stop()
                worker_budgets.close()
            raise
        # /health, then /v1/models: two calls, each within timeout_s.
        await checker.first_round(2 * config.health.timeout_s)
        checker.start(first_after_s=config.health.interval_s)  # the first round just ran
        scraper.start()
        if loads is not None:
            loads.start()
        if kv_events is not None:
            kv_events.follow({name: pool.backends for name, pool in pools.items()})
        yield
        await discovery.stop()
        if kv_events is not None:
            await kv_events.stop()
        await scraper.stop()
        if loads is not None:
            await loads.stop()
        if sessions is not None:
            await sessions.stop()
        await checker.stop()
        await upstream.close()
        if budgets is not None:
            await budgets.stop()
        if worker_budgets is not None:
            await worker_budgets.stop()
            worker_budgets.close()
        if tracing.enabled:  # the last spans out (the SDK's thread; bounded by its timeout)
            await asyncio.to_thread(tracing.shutdown)

    app.cleanup_ctx.append(resources)
    if planner is not None:
        app.cleanup_ctx.append(planner.running)
    handlers: dict[str, Handler] = {"models": models, "health": health,
                                    "health_live": health_live, "health_ready": health_ready,
                                    "metrics": metrics_endpoint, "version": passthrough.version}
    for route in ROUTES:
        if route.access == "admin":
            continue  # admin_routes(), above, when the admin API is on
        handler = (_completion_handler(route.endpoint) if route.endpoint is not None
                   else passthrough.handler(route) if route.pool is not None
                   else handlers[route.name])
        if route.method == "GET":
            app.router.add_get(route.path, handler)  # and HEAD
        else:
            app.router.add_route(route.method, route.path, handler)
    return app
