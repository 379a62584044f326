"""Tenants: who sent a request, what they may send, and in which order waiters are admitted.

Off unless ``[tenants.<name>]`` tables exist in backends.toml; then, per request:

* :mod:`lb.tenants.identity` — the tenant (API key, or a trusted header; anything else is
  the ``anonymous`` tenant) and its priority class (its own, or one it may pick by header);
* :mod:`lb.tenants.limits` — its requests / tokens windows and concurrent requests (exact
  sliding windows; :mod:`lb.tenants.redis_limits` makes them global under ``[cluster]``),
  429 + Retry-After over a limit, ``x-ratelimit-*`` headers on every answer;
* :mod:`lb.tenants.fairqueue` — admission's wait line: classes first (with aging), then
  start-time fair queuing by tokens across tenants inside a class;
* :mod:`lb.tenants.gate` — the one object the proxy calls, and the per-tenant metrics.

See docs/tenants.md.
"""
