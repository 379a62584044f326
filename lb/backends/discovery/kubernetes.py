"""Kubernetes discovery: the Ready pods a label selector picks in a namespace, watched.

Two requests of the API server's plain HTTP interface, through aiohttp (pdlb's HTTP library
already; a generated Kubernetes client would bring a large dependency for two GETs):

- list: ``GET /api/v1/namespaces/NS/pods?labelSelector=SEL&limit=500`` (pages followed by
  ``continue``), which gives the pods and the list's ``resourceVersion``;
- watch: the same with ``watch=1&resourceVersion=RV&allowWatchBookmarks=true
  &timeoutSeconds=T``: one JSON event per line (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR),
  each carrying the object's new ``resourceVersion``.

A watch that ends (the server's ``timeoutSeconds``, a proxy's idle cut) is resumed from the
last resourceVersion seen (watches start at least a second apart); one the server answers
with 410 Gone (that version is too old) starts again from a list. Any other failure is a
:class:`DiscoveryError`: the runner keeps the last good set and backs off; the next try
resumes the watch where it stopped.

A pod is a backend when it is Ready (``status.conditions`` Ready=True), has an IP
(``status.podIP``) and is not being deleted (``metadata.deletionTimestamp``); its port is
the configured number, or the container port of the configured name.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from lb.backends.discovery.dns import backend_url
from lb.backends.discovery.kubeauth import ApiAccess
from lb.backends.discovery.source import DiscoveryError, Source
from lb.config import KubernetesDiscoveryConfig

PAGE = 500
WATCH_GAP_S = 1.0
"""Watches start at least this far apart, so that a server (or a proxy) that closes each
one at once, or answers 410 to each, is not asked in a tight loop."""


class _Gone(Exception):
    """410: the resourceVersion is too old; list again."""


def pod_url(pod: Any, config: KubernetesDiscoveryConfig) -> str | None:
    """The pod's backend URL when it is Ready, has an IP and the port; else None."""
    if not isinstance(pod, dict):
        return None
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if metadata.get("deletionTimestamp") or not isinstance(status.get("podIP"), str):
        return None
    conditions = status.get("conditions") or []
    if not any(isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == "True"
               for c in conditions):
        return None
    port = config.port
    if config.port_name is not None:
        port = next((p.get("containerPort") for c in (pod.get("spec") or {}).get("containers")
                     or () for p in c.get("ports") or ()
                     if isinstance(p, dict) and p.get("name") == config.port_name), None)
    if not isinstance(port, int):
        return None
    try:
        return backend_url(config.scheme, status["podIP"], port)
    except ValueError:
        return None


class KubernetesSource(Source):
    def __init__(self, config: KubernetesDiscoveryConfig, access: ApiAccess) -> None:
        self.config = config
        self.access = access
        self.backoff_max_s = config.backoff_max_s
        self.url = (f"{access.server}/api/v1/namespaces/{quote(config.namespace, safe='')}"
                    "/pods")
        self.pods: dict[str, str | None] = {}
        """Every selected pod by name → its URL (None: not a backend now)."""
        self.resource_version: str | None = None
        self.lists = 0
        self.watches = 0
        self._session: aiohttp.ClientSession | None = None

    def details(self) -> dict[str, Any]:
        return {"resource_version": self.resource_version, "lists": self.lists,
                "watches": self.watches}

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def urls(self) -> frozenset[str]:
        return frozenset(url for url in self.pods.values() if url is not None)

    async def sets(self) -> AsyncGenerator[frozenset[str], None]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.access.ssl or False),
                json_serialize=lambda o: orjson.dumps(o).decode())
        while True:
            if self.resource_version is None:
                await self._list()
                yield self.urls()
            started = time.monotonic()
            try:
                async with contextlib.aclosing(self._watch()) as changes:
                    async for _ in changes:
                        yield self.urls()
            except _Gone:
                self.resource_version = None  # too old to resume: list again
            await asyncio.sleep(max(0.0, started + WATCH_GAP_S - time.monotonic()))

    async def _list(self) -> None:
        params = {"labelSelector": self.config.selector, "limit": str(PAGE)}
        pods: dict[str, str | None] = {}
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        while True:
            async with self._get(params, timeout) as response:
                body = await self._json(response)
            for pod in body.get("items") or ():
                name = (pod.get("metadata") or {}).get("name") if isinstance(pod, dict) else None
                if isinstance(name, str):
                    pods[name] = pod_url(pod, self.config)
            metadata = body.get("metadata") or {}
            if metadata.get("continue"):
                params["continue"] = metadata["continue"]
                continue
            version = metadata.get("resourceVersion")
            if not isinstance(version, str) or not version:
                raise DiscoveryError("the pod list has no metadata.resourceVersion")
            break
        self.pods, self.resource_version = pods, version
        self.lists += 1

    async def _watch(self) -> AsyncGenerator[None, None]:
        """Apply the watch's events from the last resourceVersion; yield after each change."""
        assert self.resource_version is not None
        params = {"labelSelector": self.config.selector, "watch": "1",
                  "resourceVersion": self.resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(int(self.config.watch_timeout_s))}
        timeout = aiohttp.ClientTimeout(total=None, connect=self.config.timeout_s,
                                        sock_read=self.config.watch_timeout_s
                                        + self.config.timeout_s)
        self.watches += 1
        async with self._get(params, timeout) as response:
            yield None  # the watch is open: the source answers (a runner's failure streak ends)
            pending = bytearray()
            while True:
                try:
                    chunk = await response.content.readany()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise DiscoveryError(f"the pod watch broke: {_why(exc)}") from None
                if not chunk:
                    break
                pending += chunk
                while (end := pending.find(b"\n")) >= 0:
                    line = bytes(pending[:end])
                    del pending[:end + 1]
                    if line.strip() and self._apply(line):
                        yield None

    def _apply(self, line: bytes) -> bool:
        """One watch event; True when the pods changed."""
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise DiscoveryError(f"the pod watch sent a line that is not JSON: {line[:80]!r}"
                                 ) from None
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(obj, dict):
            raise DiscoveryError(f"the pod watch sent an event without an object: {line[:80]!r}")
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone()
            raise DiscoveryError(f"the pod watch answered an error: {obj.get('code')}"
                                 f" {obj.get('reason')}: {obj.get('message')}")
        metadata = obj.get("metadata") or {}
        if isinstance(metadata.get("resourceVersion"), str):
            self.resource_version = metadata["resourceVersion"]
        name = metadata.get("name")
        if kind == "BOOKMARK" or not isinstance(name, str):
            return False
        before = self.pods.get(name)
        if kind == "DELETED":
            self.pods.pop(name, None)
        elif kind in ("ADDED", "MODIFIED"):
            self.pods[name] = pod_url(obj, self.config)
        else:
            raise DiscoveryError(f"the pod watch sent an unknown event type {kind!r}")
        return self.pods.get(name) != before

    @contextlib.asynccontextmanager
    async def _get(self, params: dict[str, str],
                   limits: aiohttp.ClientTimeout) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET the pods with these parameters: 200, or 410 as :class:`_Gone`, or any other
        answer or transport error as :class:`DiscoveryError`."""
        assert self._session is not None
        try:
            async with self._session.get(self.url, params=params, timeout=limits,
                                         headers=self.access.headers()) as response:
                if response.status == 410:
                    raise _Gone()
                if response.status != 200:
                    raise DiscoveryError(f"GET {response.url.path} answered {response.status}:"
                                         f" {await _status_message(response)}")
                yield response
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DiscoveryError(f"GET {self.url}: {_why(exc)}") from None

    @staticmethod
    async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
        try:
            body = orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DiscoveryError(f"reading the pod list: {_why(exc)}") from None
        except orjson.JSONDecodeError:
            raise DiscoveryError("the pod list is not JSON") from None
        if not isinstance(body, dict):
            raise DiscoveryError("the pod list is not a JSON object")
        return body


async def _status_message(response: aiohttp.ClientResponse) -> str:
    """A Status object's message (the API server's way to say why), else the body's start."""
    try:
        text = (await response.read()).decode("utf-8", "replace")
    except (aiohttp.ClientError, TimeoutError):
        return "(no body)"
    with contextlib.suppress(orjson.JSONDecodeError):
        status = orjson.loads(text)
        if isinstance(status, dict) and isinstance(status.get("message"), str):
            return str(status["message"])
    return text[:200] or "(no body)"


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
