"""EndpointSlice discovery against the test bed's real kube-apiserver: a headless Service and its
EndpointSlices made by hand; the router's watch follows adds, readiness flips, port names and deletes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from infergrid.operator.kube import KubeClient
from infergrid.router.discovery import EndpointSliceDiscovery, slice_endpoints

SLICES = "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"


def endpoint_slice(name: str, service: str, ips: dict[str, bool], port_name: str = "http") -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "ports": [{"name": "metrics", "port": 9090, "protocol": "TCP"},
                  {"name": port_name, "port": 8000, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip, ready in ips.items()],
    }


def test_slice_endpoints_ready_only_and_named_port() -> None:
    s = endpoint_slice("a", "svc", {"10.0.0.1": True, "10.0.0.2": False})
    assert slice_endpoints(s) == {"10.0.0.1:8000"}
    s["ports"] = [{"name": "other", "port": 7000}]
    assert slice_endpoints(s) == {"10.0.0.1:7000"}
    s["ports"] = []
    assert slice_endpoints(s) == set()


@pytest.mark.asyncio
async def test_endpointslice_watch_follows_the_worker_set(control_plane: Any, k8s_namespace: str) -> None:
    api = control_plane.client
    ns, service = k8s_namespace, "demo-workers"
    api.create(f"/api/v1/namespaces/{ns}/services", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": service},
        "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 8000}]}})
    api.create(SLICES.format(ns=ns), endpoint_slice("demo-a", service, {"10.1.0.1": True, "10.1.0.2": False}))
    api.create(SLICES.format(ns=ns), endpoint_slice("other", "someone-else", {"10.9.0.1": True}))

    views: list[set[str]] = []
    changed = asyncio.Event()

    def on_change(endpoints: Any) -> None:
        views.append(set(endpoints))
        changed.set()

    async def until(expected: set[str]) -> None:
        async with asyncio.timeout(15):
            while not views or views[-1] != expected:
                changed.clear()
                await changed.wait()

    kube = KubeClient.from_environment(str(control_plane.kubeconfig))
    discovery = EndpointSliceDiscovery(kube, ns, service, on_change)
    task = asyncio.create_task(discovery.run())
    try:
        await until({"10.1.0.1:8000"})  # the list: ready endpoints of this Service's slices only
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, api.create, SLICES.format(ns=ns),
                                   endpoint_slice("demo-b", service, {"10.1.0.3": True}))
        await until({"10.1.0.1:8000", "10.1.0.3:8000"})  # watched: a new slice
        path = SLICES.format(ns=ns) + "/demo-a"
        await loop.run_in_executor(None, api.merge_patch, path, {
            "endpoints": [{"addresses": ["10.1.0.1"], "conditions": {"ready": False}},
                          {"addresses": ["10.1.0.2"], "conditions": {"ready": True}}]})
        await until({"10.1.0.2:8000", "10.1.0.3:8000"})  # readiness flipped
        await loop.run_in_executor(None, api.delete, SLICES.format(ns=ns) + "/demo-b")
        await until({"10.1.0.2:8000"})  # a deleted slice
        assert discovery.synced.is_set()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kube.close()
