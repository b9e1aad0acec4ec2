"""Where the workers are: the EndpointSlices of the headless worker Service, watched through the API
(list, then watch from the list's resourceVersion; re-list on 410 Gone or a broken watch), or a static
`--workers` list. Only ready endpoints count; the port is the one named `http` (else the first)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from infergrid.operator.kube import ApiError, KubeClient

log = logging.getLogger(__name__)

API_VERSION = "discovery.k8s.io/v1"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def slice_endpoints(endpoint_slice: dict[str, Any]) -> set[str]:
    """The ready HOST:PORT endpoints of one EndpointSlice."""
    ports = endpoint_slice.get("ports") or []
    port = next((p.get("port") for p in ports if p.get("name") == "http"), None)
    if port is None and ports:
        port = ports[0].get("port")
    if port is None:
        return set()
    out: set[str] = set()
    for endpoint in endpoint_slice.get("endpoints") or []:
        if (endpoint.get("conditions") or {}).get("ready") is False:
            continue
        for address in endpoint.get("addresses") or []:
            out.add(f"{address}:{port}")
    return out


class EndpointSliceDiscovery:
    """Keeps `on_change(endpoints)` told of the union of ready endpoints over the Service's slices."""

    def __init__(self, kube: KubeClient, namespace: str, service: str,
                 on_change: Callable[[Iterable[str]], None]) -> None:
        self.kube, self.namespace, self.service = kube, namespace, service
        self.on_change = on_change
        self.selector = f"{SERVICE_NAME_LABEL}={service}"
        self.synced = asyncio.Event()
        self._slices: dict[str, set[str]] = {}

    def _publish(self) -> None:
        self.on_change(set().union(*self._slices.values()) if self._slices else set())

    async def _list(self) -> str:
        listing = await self.kube.list(API_VERSION, "EndpointSlice", self.namespace, label_selector=self.selector)
        self._slices = {s["metadata"]["name"]: slice_endpoints(s) for s in listing.get("items", [])}
        self._publish()
        self.synced.set()
        return listing["metadata"]["resourceVersion"]

    async def run(self) -> None:
        """List + watch forever (until cancelled)."""
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._list()
                async for event in self.kube.watch(API_VERSION, "EndpointSlice", self.namespace,
                                                   resource_version=version, label_selector=self.selector):
                    obj = event["object"]
                    version = obj.get("metadata", {}).get("resourceVersion", version)
                    if event["type"] == "BOOKMARK":
                        continue
                    name = obj["metadata"]["name"]
                    if event["type"] == "DELETED":
                        self._slices.pop(name, None)
                    else:
                        self._slices[name] = slice_endpoints(obj)
                    self._publish()
            except ApiError as exc:
                if exc.status == 410:
                    log.info("EndpointSlice watch expired (410): re-listing")
                else:
                    log.warning("EndpointSlice watch failed: %s; re-listing in 1 s", exc)
                    await asyncio.sleep(1.0)
                version = None
            except (TimeoutError, OSError, ValueError) as exc:
                log.warning("EndpointSlice watch broke: %s; re-listing in 1 s", exc)
                await asyncio.sleep(1.0)
                version = None
            except Exception as exc:  # aiohttp.ClientError and friends: never stop discovering
                log.warning("EndpointSlice watch error: %r; re-listing in 1 s", exc)
                await asyncio.sleep(1.0)
                version = None
