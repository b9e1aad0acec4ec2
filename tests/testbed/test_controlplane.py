"""The real control plane: fake GPU nodes, scheduling, garbage collection, start time."""

from __future__ import annotations

import ipaddress
import json
import time

import pytest

from infergrid.testbed.controlplane import POD_CIDR, ControlPlane
from infergrid.testbed.waiting import wait_for

pytestmark = pytest.mark.controlplane



def test_started_quickly_and_reports_pinned_version(control_plane: ControlPlane) -> None:
    assert control_plane.start_seconds is not None and control_plane.start_seconds < 30
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.34.4"
    assert control_plane.kubectl("auth", "can-i", "*", "*").stdout.strip() == "yes"


def test_fake_nodes_offer_eight_gpus(control_plane: ControlPlane) -> None:
    nodes = json.loads(control_plane.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    assert len(nodes) >= 2
    for node in nodes:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"
        assert node["spec"]["providerID"] == f"kwok://{node['metadata']['name']}"
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True"
        assert not [t for t in node["spec"].get("taints", []) if t["key"].startswith("node.kubernetes.io/")]


def _deployment(name: str, replicas: int, gpus: int) -> str:
    return json.dumps({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{
                    "name": "c", "image": "example.invalid/none",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }]},
            },
        },
    })


def test_deployment_pods_are_scheduled_by_gpu_capacity(control_plane: ControlPlane, k8s_namespace: str) -> None:
    ns = k8s_namespace
    # 3 pods x 8 GPUs on 2 nodes x 8 GPUs: two run (one per node), the third cannot be scheduled
    control_plane.kubectl("-n", ns, "apply", "-f", "-", input=_deployment("gpu", replicas=3, gpus=8))

    def pods():
        return json.loads(control_plane.kubectl("-n", ns, "get", "pods", "-o", "json").stdout)["items"]

    def settled():
        items = pods()
        running = [p for p in items if p["status"].get("phase") == "Running" and p["status"].get("podIP")]
        pending = [p for p in items if p["status"].get("phase") == "Pending"
                   and any(c.get("reason") == "Unschedulable" for c in p["status"].get("conditions", []))]
        return (running, pending) if len(running) == 2 and len(pending) == 1 else None

    running, pending = wait_for(settled, what="2 running + 1 unschedulable pod")
    nodes = {p["spec"]["nodeName"] for p in running}
    assert nodes == {"gpu-node-0", "gpu-node-1"}
    for p in running:
        assert ipaddress.ip_address(p["status"]["podIP"]) in ipaddress.ip_network(POD_CIDR)
        assert {c["type"]: c["status"] for c in p["status"]["conditions"]}["Ready"] == "True"
    message = next(c["message"] for c in pending[0]["status"]["conditions"] if c["type"] == "PodScheduled")
    assert "nvidia.com/gpu" in message

    # the Deployment controller counts what is available
    wait_for(lambda: json.loads(control_plane.kubectl("-n", ns, "get", "deploy", "gpu", "-o", "json").stdout)
             ["status"].get("availableReplicas") == 2, what="availableReplicas == 2")


def test_garbage_collector_deletes_dependents(control_plane: ControlPlane, k8s_namespace: str) -> None:
    ns, client = k8s_namespace, control_plane.client
    owner = client.create(f"/api/v1/namespaces/{ns}/configmaps",
                          {"metadata": {"name": "owner"}, "data": {"a": "1"}})
    client.create(f"/api/v1/namespaces/{ns}/configmaps", {
        "metadata": {"name": "dependent", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}]},
        "data": {"b": "2"},
    })
    client.delete(f"/api/v1/namespaces/{ns}/configmaps/owner")
    wait_for(lambda: client.get(f"/api/v1/namespaces/{ns}/configmaps/dependent", ok_missing=True) is None,
             what="the dependent ConfigMap to be garbage-collected")


def test_namespace_gets_default_service_account(control_plane: ControlPlane, k8s_namespace: str) -> None:
    sa = control_plane.client.get(f"/api/v1/namespaces/{k8s_namespace}/serviceaccounts/default")
    assert sa and sa["metadata"]["name"] == "default"
    # and the controller-manager published the cluster CA into the namespace
    wait_for(lambda: control_plane.client.get(
        f"/api/v1/namespaces/{k8s_namespace}/configmaps/kube-root-ca.crt", ok_missing=True), what="kube-root-ca.crt")


def test_a_stopped_component_can_be_started_again(control_plane: ControlPlane, k8s_namespace: str) -> None:
    ns = k8s_namespace
    old_pid = control_plane.pids()["kube-scheduler"]
    control_plane.stop_component("kube-scheduler")
    try:
        control_plane.kubectl("-n", ns, "run", "waiter", "--image=pause", "--restart=Never")
        time.sleep(2.0)
        pod = control_plane.client.get(f"/api/v1/namespaces/{ns}/pods/waiter")
        assert not pod["spec"].get("nodeName"), "scheduled while the scheduler was stopped"
    finally:
        control_plane.start_component("kube-scheduler")
    assert control_plane.pids()["kube-scheduler"] != old_pid
    wait_for(lambda: control_plane.client.get(f"/api/v1/namespaces/{ns}/pods/waiter")["spec"].get("nodeName"),
             what="the pod scheduled once the scheduler is back")
    with pytest.raises(ValueError, match="unknown component"):
        control_plane.stop_component("kubelet")
