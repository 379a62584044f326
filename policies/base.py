"""The routing-policy plugin interface — everything a policy author needs is in this file.

A policy picks ONE backend for ONE leg (prefill or decode) of one request. pdlb builds one
policy object per pool at start-up (``policy = "name"`` and ``[pools.<pool>.policy_options]``
in backends.toml) and calls :meth:`Policy.pick` for every request on the event loop, so:

* ``pick`` is synchronous, does no I/O and should cost microseconds;
* it gets only *usable* candidates (healthy, not at their own token budget), never an empty
  sequence, and must return one of them;
* it reads, never writes, the backend views: pdlb does all accounting itself.

A policy also says whether it reads :attr:`RouteRequest.prefix_hashes`
(:attr:`Policy.wants_prefix_hashes`): hashing the prompt costs a few µs per request, so pdlb
computes the hashes only when a pool's policy asks; for the others the field is empty.
Likewise the optional attribute ``wants_cached_tokens = True`` asks for
:attr:`RouteRequest.cached_tokens`, what each backend's own KV events say it holds of the
prompt (``policies/kv_aware.py`` is the built-in that reads it).
Optional hooks live in two more protocols: :class:`PolicyHooks` — pdlb calls
``on_request_done`` after a leg finished on a backend (for learning or stateful policies) —
and :class:`DirectDecode`, a decode policy's say on skipping the prefill hop.
:func:`policies.choose.choose` is how pdlb asks a policy — the pool and
``policies.testing.simulate`` both go through it.

A minimal policy::

    class FewestRequests:
        wants_prefix_hashes = False

        def __init__(self, options: Mapping[str, Any]) -> None:
            check_options("fewest_requests", options, {})

        def pick(self, request: RouteRequest, candidates: Sequence[BackendView]) -> BackendView:
            return min(candidates, key=lambda b: b.inflight_requests)

Register it under the entry-point group ``pdlb.policies`` in your package's pyproject::

    [project.entry-points."pdlb.policies"]
    fewest_requests = "my_package.module:FewestRequests"

and select it with ``policy = "fewest_requests"``. The factory (usually the class) is called
with the pool's ``policy_options`` table (a read-only mapping; pdlb passes a
:class:`policies.options.Options`, which knows where the table is written); raise
:class:`PolicyOptionError` for a bad option — pdlb reports it at start-up with the file, the
pool and the option named. See ``examples/`` for a complete,
installable plugin and ``policies.testing`` for fakes to unit-test ``pick``.

Helpers for factories: :func:`check_options` rejects unknown options and wrong types;
:func:`number_option` and :func:`int_option` read one option with a default and a range,
naming the option when it is out of range; :func:`read_options` gives the whole checker
(:mod:`policies.options`, which also reads backends.toml and connector options).
Randomised policies take an optional ``seed`` option and draw from :func:`seeded_rng`, so
tests are reproducible. Per-policy state (a cursor, an LRU of prefixes) lives on the policy
object: pdlb builds one per pool, never shared, and a new one on a config reload. State
keyed by :attr:`BackendView.index` is only meaningful within one policy object.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from policies.options import Kind, OptionError, Options

Leg = Literal["prefill", "decode"]


@dataclass(frozen=True, slots=True)
class ScrapedLoad:
    """The backend's own view of its load, from its ``/metrics`` (vLLM names)."""

    running: float = 0.0
    """vllm:num_requests_running"""
    waiting: float = 0.0
    """vllm:num_requests_waiting"""
    kv_usage: float = 0.0
    """vllm:kv_cache_usage_perc, a 0..1 fraction"""
    age_s: float = 0.0
    """Seconds since this sample was taken."""
    kv_capacity_tokens: int | None = None
    """KV cache size in tokens (vllm:cache_config_info num_gpu_blocks x block_size), if
    the server reports it."""


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What pdlb knows about the request when it routes one leg."""

    request_id: str
    leg: Leg
    endpoint: str
    """``completions`` or ``chat``."""
    model: str | None
    """The model name the backends serve (after pdlb's aliases), or None if the request
    named none."""
    prompt_tokens: int
    """Counted by pdlb (an estimate until the prefill's usage corrects it)."""
    max_tokens: int
    """The new tokens the decode may generate (the client's max_tokens, or pdlb's default)."""
    session_key: str | None
    """``X-Session-Id`` header, else the body's ``user`` field, else None."""
    prefix_hashes: tuple[int, ...] = ()
    """Hashes of the prompt's leading blocks, cumulative (hash i covers blocks 0..i): two
    prompts sharing k blocks share their first k hashes. Empty when not computed."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """The client's request headers, lower-case names (Authorization removed)."""
    prompt_token_ids: Sequence[int] | None = None
    """The prompt's exact token ids as the engine will see them (the model's tokenizer and
    chat template, ``[tokenizer]``), or None when pdlb has none (no exact tokenizer, a batch
    of prompts, a template it cannot render)."""
    cached_tokens: Mapping[str, int] | None = None
    """From the engines' own KV events (``[kv_events]``): backend URL → tokens of this
    prompt that backend holds in its prefix cache, for THIS leg's pool — exactly what it will
    report as ``cached_tokens``. Only backends whose events are live and fresh are present;
    a backend absent is unknown (route it by an approximate signal). None when the pool has
    no event index or the request has no token ids; computed only for a policy with
    ``wants_cached_tokens = True``."""
    shared_session: Mapping[str, str] = field(default_factory=dict)
    """``[cluster]`` with a session-keyed policy: per pool (``prefill``, ``decode``), the
    backend URL this request's session was last routed to by any replica (lb/backends/
    shared_sessions.py); empty without a cluster, for a new session, or when Redis did not
    answer in time."""
    lora: str | None = None
    """The LoRA adapter ``model`` names, or None for a base model: pdlb offers the policy
    only the backends that list the adapter in their /v1/models."""


@runtime_checkable
class BackendView(Protocol):
    """Read-only view of one backend, as a policy sees it."""

    @property
    def url(self) -> str: ...
    @property
    def index(self) -> int:
        """Position in the pool's configured list (stable across requests)."""
        ...
    @property
    def healthy(self) -> bool: ...
    @property
    def inflight_requests(self) -> int: ...
    @property
    def inflight_tokens(self) -> int:
        """Tokens pdlb has dispatched to this backend and not yet seen finish."""
        ...
    @property
    def tokens_since_scrape(self) -> int:
        """Tokens dispatched to this backend since its last /metrics sample (``load``)."""
        ...
    @property
    def load(self) -> ScrapedLoad | None:
        """Latest scraped vLLM load, or None when not scraped (yet)."""
        ...


@runtime_checkable
class Policy(Protocol):
    """Picks one backend among usable candidates. Synchronous, no I/O."""

    wants_prefix_hashes: bool
    """True: pdlb fills :attr:`RouteRequest.prefix_hashes` for this policy's pool (a class
    attribute, or an instance attribute when it depends on the options); False: the field
    is empty."""

    def pick(self, request: RouteRequest, candidates: Sequence[BackendView]) -> BackendView: ...


def wants_cached_tokens(policy: object) -> bool:
    """A policy's optional ``wants_cached_tokens`` attribute (default False): True asks pdlb
    to fill :attr:`RouteRequest.cached_tokens` from the pool's KV-event index."""
    return bool(getattr(policy, "wants_cached_tokens", False))


@runtime_checkable
class SessionKeyed(Protocol):
    """Optional: a policy whose choice follows a session key. With ``[cluster]``, pdlb
    shares each session's backend across replicas and hands it back in
    :attr:`RouteRequest.shared_session`."""

    def session_key(self, request: RouteRequest) -> str | None: ...


@runtime_checkable
class DirectDecode(Protocol):
    """Optional, for a DECODE pool's policy: conditional disaggregation.

    Before the prefill leg, pdlb asks the decode pool's policy whether one decode backend
    should serve the whole request alone (it computes the prompt itself: no prefill hop, no
    KV transfer). Return that backend, or None for the usual prefill-then-decode. The
    request is the decode leg's (``cached_tokens`` filled for the decode pool when the
    policy wants them); the candidates are the usable decode backends."""

    def pick_direct(self, request: RouteRequest, candidates: Sequence[BackendView]
                    ) -> BackendView | None: ...


@runtime_checkable
class PolicyHooks(Protocol):
    """Optional: implement to hear when a leg finished on the backend you picked."""

    def on_request_done(
        self, request: RouteRequest, backend: BackendView, ok: bool, duration_s: float
    ) -> None: ...


PolicyFactory = Callable[[Mapping[str, Any]], Policy]


class PolicyOptionError(OptionError):
    """Raised by a policy factory for a bad option; the message should name the option."""


def read_options(policy: str, options: Mapping[str, Any]) -> Options:
    """``options`` as an :class:`~policies.options.Options` reader (pdlb passes one; a test
    may pass a plain dict), for checks beyond the helpers below: ``.choice(...)``,
    ``.sub("table")``, ``.fail(name, why)`` — errors name ``policy_options.<key>``."""
    if isinstance(options, Options):
        return options
    return Options(options, "policy_options", owner=f"policy {policy!r}",
                   error=PolicyOptionError)


def check_options(policy: str, options: Mapping[str, Any], allowed: Mapping[str, Kind]) -> None:
    """Reject unknown options and options of the wrong type, naming them."""
    read_options(policy, options).check(allowed)


def number_option(
    policy: str, options: Mapping[str, Any], name: str, default: float,
    *, minimum: float | None = None, maximum: float | None = None,
) -> float:
    """Read a numeric option (an int is accepted) within ``[minimum, maximum]``, naming it."""
    return read_options(policy, options).number(name, default, minimum=minimum, maximum=maximum)


def int_option(
    policy: str, options: Mapping[str, Any], name: str, default: int,
    *, minimum: int | None = None, maximum: int | None = None,
) -> int:
    """Read an integer option within ``[minimum, maximum]``, naming it."""
    return read_options(policy, options).integer(name, default, minimum=minimum, maximum=maximum)


def seeded_rng(options: Mapping[str, Any]) -> random.Random:
    """A private generator for a randomised policy: seeded by its ``seed`` option when given
    (reproducible tests), else from the OS. Never use the module-global ``random``."""
    seed = options.get("seed")
    return random.Random(seed) if seed is not None else random.Random()
