"""The admin surface — off by default; token-protected; optionally on its own address.

``POST /admin/reload`` (and SIGHUP) re-reads backends.toml and applies what can change without
dropping a request: each pool's backends (kept ones keep their counters and health, removed
ones finish their in-flight requests, added ones join after their first health check, which
the HTTP answer waits for), policy and options, backend keys, the admission budgets, and the
pools' discovery tables (discovered backends merge with the file's). Anything else (listen
address, timeouts, connector, tokenizer) needs a restart, and the reload answer lists what
it ignored. ``GET /admin/state`` shows pools, backends, counters and discovery sources.
``POST /admin/kv/lookup`` (with ``[kv_events]`` on) answers, for a completion or chat body,
the prompt's token count and what each backend's own KV events say it holds of it — the
numbers ``kv_aware`` routes by.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from lb.admission import Admission
from lb.backends.cluster import RedisBudgets
from lb.backends.discovery import Discovery
from lb.backends.kvevents import KVEvents
from lb.backends.pool import Pool
from lb.config import Config
from lb.errors import ConfigError, PdlbError, Unauthorized
from lb.serve.auth import bearer, matches
from lb.serve.routes import named
from policies.registry import PolicyLoadError, build_policy

log = logging.getLogger("pdlb.admin")

Reloader = Callable[[], Config]


def apply_reload(
    current: Config, new: Config, pools: dict[str, Pool],
    admissions: list[tuple[Admission, dict[str, str]]],
    rebuild_all: Callable[[], None], discovery: Discovery | None = None,
) -> dict[str, Any]:
    """Validate ``new`` fully, then apply it; raise ConfigError and change nothing on error.
    With ``discovery``, each pool gets the file's backends plus what its sources found
    (sources whose table changed start again; the others keep their set). ``admissions``:
    each model group's admission and its stages' pool names. The set of model groups and
    their names, aliases and connectors are fixed until a restart."""
    if set(new.pools) != set(current.pools):
        raise ConfigError(f"{new.source}: the pools would change from {sorted(current.pools)}"
                          f" to {sorted(new.pools)}; adding or removing models or pools needs"
                          " a restart")
    policies = {}
    for name, pool_config in new.pools.items():
        try:
            policies[name] = build_policy(pool_config.policy, pool_config.policy_options,
                                          pool=name)
        except PolicyLoadError as exc:
            raise ConfigError(f"{new.source}: {exc}") from None
    if discovery is not None:
        discovery.reconfigure(new.pools)  # the last check that can fail: nothing changed yet
    report: dict[str, Any] = {"pools": {}}
    for name, pool_config in new.pools.items():
        if discovery is not None:
            pool_config = discovery.merged(pool_config)
        added, removed = pools[name].replace_backends(pool_config, policies[name])
        report["pools"][name] = {"added": added, "removed": removed,
                                 "backends": [b.url for b in pools[name].backends]}
    for admission, names in admissions:
        admission.reconfigure({stage: new.pools[name] for stage, name in names.items()})
    rebuild_all()
    ignored = [section for section in ("server", "kv_transfer", "tokenizer", "health", "scrape",
                                       "resilience", "auth", "admin", "log", "kv_events",
                                       "tracing", "cluster", "models", "aliases",
                                       "default_model", "tenancy")
               if getattr(current, section) != getattr(new, section)]
    report["needs_restart_to_apply"] = ignored
    log.info("%s", describe_reload(new.source, report))
    return report


def describe_reload(source: str, report: dict[str, Any]) -> str:
    """A reload's report in one plain sentence, for the log."""
    parts = []
    for name, pool in report["pools"].items():
        count = len(pool["backends"])
        change = ", ".join([*(f"added {u}" for u in pool["added"]),
                            *(f"removed {u}" for u in pool["removed"])]) or "unchanged"
        parts.append(f"{name} pool {change} ({count} backend{'s' if count != 1 else ''})")
    text = f"reloaded {source}: " + "; ".join(parts)
    if report["needs_restart_to_apply"]:
        text += ("; changed but not applied until a restart: "
                 + ", ".join(f"[{s}]" for s in report["needs_restart_to_apply"]))
    return text


def state(pools: dict[str, Pool], admission: Admission,
          kv_events: KVEvents | None = None, discovery: Discovery | None = None,
          cluster: RedisBudgets | None = None) -> dict[str, Any]:
    """Pools, backends and counters; with ``[kv_events]`` on, each backend's event health
    (subscriber state, counters, blocks in the pool's index); with discovery, each source's
    state, last good set and counters, and the removed backends still finishing requests;
    with ``[cluster]``, this replica's name, whether Redis answers, the global use the last
    reservation saw, and the other replicas' in-flight numbers per backend."""
    return {
        "pools": {
            name: {
                "policy": pool.config.policy,
                "inflight_requests": pool.inflight_requests,
                "inflight_tokens": pool.inflight_tokens,
                **({} if discovery is None or not discovery.runners.get(name) else {
                    "discovery": discovery.status(name),
                    "draining": [{"url": b.url, "inflight_requests": b.inflight_requests}
                                 for b in pool.draining.values() if b.inflight_requests]}),
                "backends": [
                    {"url": b.url, "healthy": b.healthy, "pending": b.pending,
                     "inflight_requests": b.inflight_requests,
                     "inflight_tokens": b.inflight_tokens,
                     **({} if cluster is None else {
                         "others_inflight_requests": b.others_requests,
                         "others_inflight_tokens": b.others_tokens}),
                     "load": None if b.load is None else {
                         "running": b.load.running, "waiting": b.load.waiting,
                         "kv_usage": b.load.kv_usage},
                     **({} if kv_events is None else {"kv_events": kv_events.health(name, b.url)})}
                    for b in pool.backends
                ],
            }
            for name, pool in pools.items()
        },
        "admission": {stage: admission.admitted_tokens(stage) for stage in ("prefill", "decode")},
        **({} if cluster is None else {"cluster": {
            "replica": cluster.replica, "redis_up": cluster.shared,
            "global_admitted_tokens": dict(cluster.global_used)}}),
    }


Lookup = Callable[[bytes], Awaitable[dict[str, Any]]]


def admin_routes(token: str, reload: Callable[[], dict[str, Any]],
                 get_state: Callable[[], dict[str, Any]], lookup: Lookup,
                 joined: Callable[[], Awaitable[None]] | None = None) -> list[web.RouteDef]:
    """``joined``: awaited after a reload, so that its answer comes once the added backends
    had their first health check (bounded by the caller)."""

    def check(request: web.Request) -> None:
        if not matches(bearer(request.headers.get("Authorization", "")), [token]):
            raise Unauthorized("admin token required: Authorization: Bearer <token>",
                               code="invalid_admin_token")

    async def do_reload(request: web.Request) -> web.Response:
        check(request)
        try:
            report = reload()
        except ConfigError as exc:
            raise PdlbError(f"reload refused, nothing changed: {exc}", status=400,
                            code="invalid_config") from None
        if joined is not None:
            await joined()
        return web.Response(body=orjson.dumps(report), content_type="application/json")

    async def show_state(request: web.Request) -> web.Response:
        check(request)
        return web.Response(body=orjson.dumps(get_state()), content_type="application/json")

    async def kv_lookup(request: web.Request) -> web.Response:
        check(request)
        answer = await lookup(await request.read())
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    handlers = {"admin_reload": do_reload, "admin_state": show_state, "admin_kv_lookup": kv_lookup}
    return [web.get(r.path, handlers[r.name]) if r.method == "GET"
            else web.route(r.method, r.path, handlers[r.name]) for r in named(*handlers)]
