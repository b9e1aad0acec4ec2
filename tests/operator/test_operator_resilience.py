"""Crash and outage resilience: SIGKILL during reconciles, a 60 s API server outage, peering fail-over."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from operator_cluster import (
    NUM_CHILDREN,
    OperatorProcess,
    apply_isvc,
    children,
    condition,
    get_isvc,
    install_crds,
    install_operator_rbac,
    wait_for,
)

from infergrid.operator.builders import build_children
from infergrid.operator.config import OperatorConfig
from infergrid.operator.spec import ServiceSpec
from infergrid.testbed.controlplane import ControlPlane

EXPECTED_KINDS = {("Deployment", "{n}-worker"), ("Service", "{n}"), ("Service", "{n}-workers"),
                  ("PodDisruptionBudget", "{n}-worker"), ("NetworkPolicy", "{n}-worker"),
                  ("Deployment", "{n}-router"), ("NetworkPolicy", "{n}-router"), ("ServiceAccount", "{n}-router"),
                  ("Role", "{n}-router"), ("RoleBinding", "{n}-router")}


def random_spec(rng: random.Random) -> dict:
    """A spec that differs in replicas, engine args and optional fields that come and go."""
    spec: dict = {
        "model": {"source": f"file:///models/m{rng.randint(0, 3)}"},
        "engine": {"tensorParallelSize": rng.choice([1, 2]), "maxNumSeqs": rng.randint(1, 512)},
        "replicas": rng.randint(0, 3),
    }
    if rng.random() < 0.5:
        spec["nodeSelector"] = {"pool": rng.choice(["a", "b"])}
    if rng.random() < 0.5:
        spec["podTemplate"] = {"metadata": {"annotations": {"chaos": str(rng.random())}}}
    return spec


def assert_children_match(cp: ControlPlane, ns: str, name: str) -> None:
    """Exactly the ten children, each owned once by the live service and equal to what the builders say."""
    isvc = get_isvc(cp, ns, name)
    assert isvc is not None
    found = children(cp, ns, name)
    kinds = sorted((ch["kind"], ch["metadata"]["name"]) for ch in found)
    assert kinds == sorted((k, n.format(n=name)) for k, n in EXPECTED_KINDS), kinds
    for child in found:
        assert child["metadata"]["ownerReferences"] == [{
            "apiVersion": "infergrid.dev/v1alpha1", "kind": "InferenceService", "name": name,
            "uid": isvc["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    desired = {(ch["kind"], ch["metadata"]["name"]): ch
               for ch in build_children(ServiceSpec.from_body(isvc), OperatorConfig())}
    deployment = next(ch for ch in found if (ch["kind"], ch["metadata"]["name"]) == ("Deployment", f"{name}-worker"))
    want = desired[("Deployment", f"{name}-worker")]
    assert deployment["spec"]["replicas"] == want["spec"]["replicas"]
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"] == want["spec"]["template"]["metadata"]["annotations"]
    assert template["spec"]["containers"][0]["args"] == want["spec"]["template"]["spec"]["containers"][0]["args"]
    # Fields the last spec dropped are gone (server-side apply removes what the operator stopped applying).
    assert template["spec"].get("nodeSelector") == want["spec"]["template"]["spec"].get("nodeSelector")


@pytest.mark.slow
def test_sigkill_at_random_points_during_20_reconciles(control_plane, k8s_namespace, make_operator):
    cp, ns = control_plane, k8s_namespace
    rng = random.Random(20260101)
    names = ["alpha", "beta", "gamma"]
    operator = make_operator("chaos-0")
    for name in names:
        apply_isvc(cp, ns, name, random_spec(rng))
    for _ in range(20):
        for name in names:
            apply_isvc(cp, ns, name, random_spec(rng))
        time.sleep(rng.uniform(0.0, 1.2))  # somewhere inside the reconciles this triggered
        operator.kill()
        operator.start(wait=rng.random() < 0.5)  # sometimes kill again before it is even healthy
    wait_for(operator.is_healthy, 60, "operator healthy")
    assert operator.starts == 21

    def settled():
        for name in names:
            isvc = get_isvc(cp, ns, name)
            if (isvc.get("status") or {}).get("observedGeneration") != isvc["metadata"]["generation"]:
                return False
        return True
    wait_for(settled, 90, "every service's latest generation observed")
    for name in names:
        assert_children_match(cp, ns, name)
    # Nothing the operator manages is left without a live owner.
    live = {get_isvc(cp, ns, n)["metadata"]["uid"] for n in names}
    for kind, path in [("deployments", "/apis/apps/v1"), ("services", "/api/v1"),
                       ("poddisruptionbudgets", "/apis/policy/v1"), ("networkpolicies", "/apis/networking.k8s.io/v1")]:
        listing = cp.client.get(f"{path}/namespaces/{ns}/{kind}",
                                labelSelector="app.kubernetes.io/managed-by=infergrid-operator")
        for item in listing["items"]:
            assert {ref["uid"] for ref in item["metadata"]["ownerReferences"]} <= live, item["metadata"]["name"]
    # The operator keeps no bookkeeping in the objects (level-triggered: nothing half-done to resume).
    for name in names:
        isvc = get_isvc(cp, ns, name)
        assert set(isvc["metadata"].get("annotations") or {}) == {"kubectl.kubernetes.io/last-applied-configuration"}
        assert not isvc["metadata"].get("finalizers")


# ------------------------------------------------------------------ API server outage


@pytest.fixture
def private_control_plane(tmp_path: Path) -> Iterator[ControlPlane]:
    """A control plane of our own: this test stops its API server, which others must not see."""
    cp = ControlPlane(nodes=1, workdir=tmp_path / "cp")
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.mark.slow
@pytest.mark.controlplane  # a private control plane (not the session fixture)
def test_operator_recovers_from_a_60s_api_server_outage_without_restarting(private_control_plane, tmp_path):
    cp = private_control_plane
    install_crds(cp)
    operator = OperatorProcess(install_operator_rbac(cp, tmp_path), tmp_path, "outage-0").start()
    cp.kubectl("create", "namespace", "team")
    apply_isvc(cp, "team", "before", {"model": {"source": "file:///m"}, "replicas": 1})
    wait_for(lambda: len(children(cp, "team", "before")) == NUM_CHILDREN, 30, "children of the first service")

    cp.stop_component("kube-apiserver")
    down_since = time.monotonic()
    time.sleep(60)
    assert operator.is_alive(), operator.log_tail()
    cp.start_component("kube-apiserver")
    print(f"API server was down {time.monotonic() - down_since:.0f}s")

    recovered = time.monotonic()
    apply_isvc(cp, "team", "after", {"model": {"source": "file:///m"}, "replicas": 1})
    cp.kubectl("scale", "inferenceservice/before", "-n", "team", "--replicas=2")
    wait_for(lambda: len(children(cp, "team", "after")) == NUM_CHILDREN, 120, "children of a service created after")
    wait_for(lambda: cp.client.get("/apis/apps/v1/namespaces/team/deployments/before-worker")["spec"]["replicas"]
             == 2, 60, "the scale made during recovery applied")
    wait_for(lambda: condition(get_isvc(cp, "team", "after"), "WorkersReady"), 60, "status on the new service")
    print(f"reconciling again {time.monotonic() - recovered:.1f}s after the API server came back")
    assert operator.starts == 1 and operator.is_alive()
    operator.stop()


# ------------------------------------------------------------------ peering fail-over


@pytest.mark.slow
def test_a_standby_replica_takes_over_when_the_active_one_dies(control_plane, k8s_namespace, make_operator):
    cp, ns = control_plane, k8s_namespace
    active = make_operator("replica-a", "--priority", "200", "--peering-lifetime", "10")
    standby = make_operator("replica-b", "--priority", "100", "--peering-lifetime", "10")
    apply_isvc(cp, ns, "one", {"model": {"source": "file:///m"}, "replicas": 1})
    wait_for(lambda: len(children(cp, ns, "one")) == NUM_CHILDREN, 30, "children made by the active replica")
    standby_before = standby.metrics().get('infergrid_operator_reconciles_total{result="ok"}', 0.0)
    assert standby_before == 0.0  # the standby stays paused while the active one lives
    # The autoscaler (not a kopf handler) follows the same peering rule: only the active replica decides.
    apply_isvc(cp, ns, "auto", {"model": {"source": "file:///m"}, "autoscaling": {"maxReplicas": 2}})

    def decisions(proc: OperatorProcess) -> float:
        return sum(v for k, v in proc.metrics().items() if k.startswith("infergrid:autoscaler_decisions_total{"))
    wait_for(lambda: decisions(active) >= 2, 30, "decisions of the active replica's autoscaler")
    assert decisions(standby) == 0

    active.kill()
    killed = time.monotonic()
    apply_isvc(cp, ns, "two", {"model": {"source": "file:///m"}, "replicas": 1})
    wait_for(lambda: len(children(cp, ns, "two")) == NUM_CHILDREN, 60, "children made by the standby")
    print(f"fail-over: {time.monotonic() - killed:.1f}s after SIGKILL of the active replica")
    assert standby.metrics()['infergrid_operator_reconciles_total{result="ok"}'] >= 1
    wait_for(lambda: decisions(standby) >= 1, 30, "decisions of the new active replica's autoscaler")
