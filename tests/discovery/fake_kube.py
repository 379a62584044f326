"""A small Kubernetes API server for the discovery tests: pods in one namespace, listed and
watched as the real one does it (no cluster runs on these machines).

``GET /api/v1/namespaces/NS/pods?labelSelector=k=v[,k=v]``: a PodList with
``metadata.resourceVersion`` (pages with ``limit`` / ``continue``); with ``watch=1`` and
``resourceVersion=RV``: every event after RV, then each new one as it happens, one JSON
object per line, until ``timeoutSeconds`` or :meth:`FakeKube.end_watches`. An RV older
than the compaction point gets a 410 — an ERROR event (what the API server sends) or, with
``gone_as_http``, the HTTP status. Faults: the next N requests answered with a status.
Every request's query is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from tests.discovery.support import until

TOKEN = "test-token"


def pod(name: str, ip: str | None, port: int, *, ready: bool = True,
        labels: dict[str, str] | None = None, port_name: str = "http") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "llm",
                     "labels": labels if labels is not None else {"llm-d.ai/role": "prefill"}},
        "spec": {"containers": [{"name": "vllm", "ports": [
            {"name": "metrics", "containerPort": 9999},
            {"name": port_name, "containerPort": port}]}]},
        "status": {"phase": "Running", **({"podIP": ip} if ip else {}), "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"}]},
    }


class FakeKube:
    def __init__(self, namespace: str = "llm", token: str = TOKEN) -> None:
        self.namespace = namespace
        self.token = token
        self.version = 100
        self.pods: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self.compacted = 0
        """Watches from a resourceVersion below this get 410 Gone."""
        self.gone_as_http = False
        self.faults: list[int] = []
        """Statuses for the next requests, one each."""
        self.requests: list[dict[str, str]] = []
        self.tokens: list[str] = []
        self.watching = 0
        self.closed = 0
        self._changed = asyncio.Condition()
        self._generation = 0
        """Watches opened before :meth:`end_watches` raised it end."""
        self.runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------------ the cluster
    async def put(self, obj: dict[str, Any]) -> None:
        """Create or replace a pod (ADDED or MODIFIED)."""
        name = obj["metadata"]["name"]
        kind = "MODIFIED" if name in self.pods else "ADDED"
        await self._record(kind, obj)
        self.pods[name] = obj

    async def update(self, name: str, *, ready: bool | None = None, ip: str | None = None,
                     deleting: bool = False) -> None:
        obj = orjson.loads(orjson.dumps(self.pods[name]))
        if ready is not None:
            obj["status"]["conditions"][1]["status"] = "True" if ready else "False"
        if ip is not None:
            obj["status"]["podIP"] = ip
        if deleting:
            obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        await self.put(obj)

    async def delete(self, name: str) -> None:
        obj = self.pods.pop(name)
        await self._record("DELETED", obj)

    async def bookmark(self) -> None:
        self.version += 1
        self.events.append((self.version, "BOOKMARK", {
            "kind": "Pod", "metadata": {"resourceVersion": str(self.version)}}))
        async with self._changed:
            self._changed.notify_all()

    def compact(self) -> None:
        """Forget the history: a watch from a version older than the current one gets 410."""
        self.compacted = self.version

    async def end_watches(self) -> None:
        """Close every open watch (as a server's timeoutSeconds or a proxy would)."""
        ending = self.watching
        self._generation += 1
        async with self._changed:
            self._changed.notify_all()
        await until(lambda: self.closed >= ending, "the watches closed")
        self.closed = 0

    async def _record(self, kind: str, obj: dict[str, Any]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.events.append((self.version, kind, orjson.loads(orjson.dumps(obj))))
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ the API
    def _selected(self, obj: dict[str, Any], selector: str) -> bool:
        labels = obj["metadata"].get("labels") or {}
        wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
        return all(labels.get(k) == v for k, v in wanted.items())

    async def _pods(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append(query)
        self.tokens.append(request.headers.get("Authorization", ""))
        if request.match_info["ns"] != self.namespace:
            return web.json_response({"kind": "Status", "code": 403, "message": "forbidden"},
                                     status=403)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"kind": "Status", "code": 401, "message": "Unauthorized"},
                                     status=401)
        if self.faults:
            status = self.faults.pop(0)
            return web.json_response({"kind": "Status", "code": status,
                                      "message": "injected fault"}, status=status)
        selector = query.get("labelSelector", "")
        if query.get("watch") in ("1", "true"):
            return await self._watch(request, selector, int(query["resourceVersion"]),
                                     float(query.get("timeoutSeconds", "300")))
        items = sorted((p for p in self.pods.values() if self._selected(p, selector)),
                       key=lambda p: p["metadata"]["name"])
        start = int(query.get("continue", "0"))
        limit = int(query.get("limit", "0")) or len(items) or 1
        page = items[start:start + limit]
        metadata: dict[str, Any] = {"resourceVersion": str(self.version)}
        if start + limit < len(items):
            metadata["continue"] = str(start + limit)
        return web.json_response({"kind": "PodList", "apiVersion": "v1",
                                  "metadata": metadata, "items": page})

    async def _watch(self, request: web.Request, selector: str, since: int,
                     timeout_s: float) -> web.StreamResponse:
        if since < self.compacted and self.gone_as_http:
            return web.json_response({"kind": "Status", "code": 410, "reason": "Expired",
                                      "message": "too old resource version"}, status=410)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        if since < self.compacted:
            await response.write(orjson.dumps({"type": "ERROR", "object": {
                "kind": "Status", "code": 410, "reason": "Expired",
                "message": f"too old resource version: {since}"}}) + b"\n")
            return response
        self.watching += 1
        generation = self._generation
        sent = since
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            while generation == self._generation:
                for version, kind, obj in self.events:
                    if version > sent:
                        sent = version
                        if kind == "BOOKMARK" or self._selected(obj, selector):
                            await response.write(orjson.dumps({"type": kind, "object": obj})
                                                 + b"\n")
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), min(left, 0.05))
        finally:
            self.watching -= 1
            if generation != self._generation:
                self.closed += 1
        return response

    # ------------------------------------------------------------------ serving
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods)
        return app

    async def start(self, ssl_context: Any = None) -> str:
        self.runner = web.AppRunner(self.app(), shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self._generation += 1
        if self.runner is not None:
            await self.runner.cleanup()


@contextlib.asynccontextmanager
async def fake_kube(**kwargs: Any) -> AsyncIterator[FakeKube]:
    kube = FakeKube(**kwargs)
    await kube.start()
    try:
        yield kube
    finally:
        await kube.stop()


def watches(kube: FakeKube) -> list[dict[str, str]]:
    return [q for q in kube.requests if q.get("watch")]


def lists(kube: FakeKube) -> list[dict[str, str]]:
    return [q for q in kube.requests if not q.get("watch")]
