"""Many models behind one door: a request's ``model`` picks its model group.

A *model group* is one prefill pool + one decode pool with their own admission budgets,
connector, tokenizer and :class:`~lb.proxy.Proxy`: the top-level ``[pools]`` (the group
named ``""``; its backends may serve several models) and one per ``[models."<name>"]``
(pools ``<name>/prefill`` and ``<name>/decode``). :class:`ModelRouter` is what the fronts
call: it reads and parses the body once, resolves the name, and hands the parsed request to
the group's proxy. Resolution, in order:

1. no ``model``: ``[server] default_model`` if set; else the only group (vLLM then uses its
   one served model); with several groups, 400 ``model_required``;
2. an alias (``[aliases]``, ``models.*.aliases``) is replaced by what it stands for;
3. a ``[models]`` name: that group, and the body's ``model`` becomes its ``served_name``;
4. a name some group's backends list in ``/v1/models`` (base model or LoRA adapter, as of
   the last health round): that group; an adapter restricts both legs to the backends that
   list it (:attr:`policies.base.RouteRequest.lora`);
5. anything else: 404 ``model_not_found`` in OpenAI's shape, no backend touched — unless
   the top-level pools' backends have not answered ``/v1/models`` yet (then they judge).

The served-name table is rebuilt from the backends at most every ``REFRESH_S``; a request
pays one dict lookup.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from lb.backends.pool import Backend, Pool
from lb.config import Config
from lb.errors import InvalidRequest, Overloaded
from lb.metrics import Metrics
from lb.proxy import Proxy
from lb.request import Endpoint, ProxyRequest, parse_request
from lb.stream.port import ClientSide
from lb.tracing import Tracing

REFRESH_S = 0.5
"""How stale the served-name table may be (health rounds are ``interval_s`` apart anyway)."""

OTHER = "other"
"""The ``model`` label of a name pdlb does not know (bounded cardinality)."""
NONE = "none"
"""The ``model`` label of a request that named no model."""


@dataclass(slots=True)
class ModelGroup:
    name: str
    """The ``[models]`` name, or "" for the top-level pools."""
    served_name: str | None
    """What its backends serve (``[models]`` groups); None for the top-level pools."""
    pools: Mapping[str, Pool]
    """``prefill`` and ``decode``."""
    proxy: Proxy

    def backends(self) -> list[Backend]:
        return [b for pool in self.pools.values() for b in pool.backends]


def model_not_found(name: str) -> InvalidRequest:
    return InvalidRequest(f"The model `{name}` does not exist.", param="model",
                          code="model_not_found", status=404)


class ModelRouter:
    """Request → model group; the fronts' entry point (``handle``)."""

    def __init__(self, config: Config, groups: list[ModelGroup], metrics: Metrics) -> None:
        if not groups:
            raise ValueError("no model group")
        self.groups = groups
        self.by_name = {g.name: g for g in groups if g.name}
        self.default = next((g for g in groups if not g.name), None)
        self.aliases = dict(config.aliases)
        self.default_model = config.default_model
        self.limit = config.server.max_concurrent_requests
        self.active_requests = 0
        self._metrics = metrics
        self._served: dict[str, tuple[ModelGroup, bool]] = {}
        self._built = -REFRESH_S
        self._default_known = False
        self._model_requests = metrics.model_requests

    @property
    def tracing(self) -> Tracing:
        return self.groups[0].proxy.tracing

    @property
    def proxy(self) -> Proxy:
        """The first group's proxy (the top-level pools' when configured)."""
        return (self.default or self.groups[0]).proxy

    # ------------------------------------------------------------ the request path
    async def handle(self, client: ClientSide, endpoint: Endpoint) -> None:
        limit = self.limit
        if limit is not None and self.active_requests >= limit:
            self._metrics.rejections.labels(stage="server", reason="too_many_requests").inc()
            raise Overloaded(f"pdlb is serving its limit of {limit} concurrent requests",
                             stage="server", reason="too_many_requests", status=503,
                             retry_after_s=1.0)
        self.active_requests += 1
        try:
            raw = client.whole_body if client.whole_body is not None else await client.body()
            request = parse_request(raw, endpoint, client.headers)
            record = client.record
            record.request_id, record.model = request.request_id, request.model
            group, request, lora = self.resolve(request)
            await group.proxy.handle(client, endpoint, (raw, request, lora))
        finally:
            self.active_requests -= 1

    def resolve(self, request: ProxyRequest) -> tuple[ModelGroup, ProxyRequest, str | None]:
        """The group, the request with ``model`` as the backends name it, and the LoRA
        adapter it names (None for a base model)."""
        asked = request.model
        group, served, lora = self.resolve_name(asked)
        if served is not None and served != asked:
            body = dict(request.body)
            body["model"] = served
            request = dataclasses.replace(request, body=body, model=served)
        return group, request, lora

    def resolve_name(self, asked: str | None) -> tuple[ModelGroup, str | None, str | None]:
        """(group, the name to send or None to leave the body alone, the adapter or None)."""
        name = asked or self.default_model
        if not name:
            if len(self.groups) == 1:
                return self.groups[0], None, None
            raise InvalidRequest("this server serves several models: name one in `model`"
                                 " (GET /v1/models lists them)", param="model",
                                 code="model_required")
        name = self.aliases.get(name, name)
        group = self.by_name.get(name)
        if group is not None:
            return group, group.served_name, None
        found = self.served().get(name)
        if found is not None:
            group, is_adapter = found
            return group, name, (name if is_adapter else None)
        if self.default is not None and not self._default_known:
            return self.default, name, None  # nothing known yet: its backends judge
        raise model_not_found(asked or name)

    def served(self) -> dict[str, tuple[ModelGroup, bool]]:
        """Served name → (group, whether it is a LoRA adapter), from the last health round."""
        now = time.monotonic()
        if now - self._built >= REFRESH_S:
            table: dict[str, tuple[ModelGroup, bool]] = {}
            default_known = False
            for group in self.groups:
                if group.served_name is not None:
                    table.setdefault(group.served_name, (group, False))
                for backend in group.backends():
                    if backend.models is not None:
                        default_known = default_known or not group.name
                        for model in backend.models:
                            table.setdefault(model, (group, False))
                    for adapter in backend.adapters:
                        table.setdefault(adapter, (group, True))
            self._served = table
            self._default_known = default_known
            self._built = now
        return self._served

    # ------------------------------------------------------------ labels and listings
    def label(self, model: str | None) -> str:
        """A bounded ``model`` label: a configured, aliased or served name, else "other"."""
        if not model:
            return NONE
        if model in self.by_name or model in self.aliases or model in self.served():
            return model
        return OTHER

    def count(self, model: str | None, endpoint: str, status: int) -> None:
        self._model_requests.labels(model=self.label(model), endpoint=endpoint,
                                    status=str(status)).inc()

    def pools_for_body(self, body: bytes, pool: str) -> tuple[Pool, bytes, str | None]:
        """For a pass-through route: the group's pool named ``pool`` for the body's
        ``model`` (aliases resolved, 404 for an unknown one), the body to send (its
        ``model`` rewritten when an alias or a ``[models]`` name stood for another), and the
        LoRA adapter. A body that is not a JSON object goes to the first group as it is
        (the backend answers the error)."""
        try:
            parsed = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            return (self.default or self.groups[0]).pools[pool], body, None
        asked = parsed.get("model")
        group, served, lora = self.resolve_name(asked if isinstance(asked, str) else None)
        if served is not None and served != asked:
            parsed["model"] = served
            body = orjson.dumps(parsed)
        return group.pools[pool], body, lora

    def listing(self, cards: Mapping[str, dict[str, object]]) -> list[dict[str, object]]:
        """``/v1/models``: every card the backends listed (``cards``: id → card, as
        vLLM wrote it: ``root``, ``parent``, ``owned_by``), then each ``[models]`` name and
        alias that is not itself served, as a card of its own whose ``root`` is the served
        model it stands for."""
        out = dict(cards)
        for public, target in [*((g.name, g.served_name or g.name) for g in self.by_name.values()),
                               *self.aliases.items()]:
            if public in out:
                continue
            group = self.by_name.get(target)
            served = group.served_name if group is not None and group.served_name else target
            base = cards.get(served)
            if base is None:
                continue  # nothing serves it now: not listed
            out[public] = {**base, "id": public, "root": base.get("root", served),
                           "parent": base.get("parent")}
        return list(out.values())
