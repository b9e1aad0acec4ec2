"""Running `infergrid-operator` against a test-bed control plane, under the chart's ClusterRole.

The operator never runs as cluster-admin here: the chart is rendered with helm, its ServiceAccount,
ClusterRole, ClusterRoleBinding and peering object are applied, and the operator gets a kubeconfig
holding a token of that ServiceAccount.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from operator_helpers import CHART, CRD_PATH

from infergrid.testbed.controlplane import ControlPlane
from infergrid.testbed.procs import free_port, terminate_pid
from infergrid.testbed.waiting import wait_for

RELEASE, RELEASE_NAMESPACE = "rel", "infergrid-system"
SERVICE_ACCOUNT = f"{RELEASE}-infergrid"
PEERING = f"{RELEASE}-infergrid"  # the chart names the peering object after the release
PEERING_CRDS = CHART / "crds" / "kopf-peering.yaml"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}



def install_crds(cp: ControlPlane) -> None:
    cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_PATH), "-f", str(PEERING_CRDS))
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/inferenceservices.infergrid.dev",
               "crd/clusterkopfpeerings.kopf.dev", "crd/kopfpeerings.kopf.dev")


def install_operator_rbac(cp: ControlPlane, workdir: Path) -> Path:
    """Apply the chart's RBAC + peering objects and return a kubeconfig for its ServiceAccount."""
    rendered = subprocess.run(
        [str(cp.bin_dir / "helm"), "template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE],
        capture_output=True, text=True, check=True).stdout
    docs = [doc for doc in yaml.safe_load_all(rendered) if doc and doc["kind"] in RBAC_KINDS]
    assert {doc["kind"] for doc in docs} == RBAC_KINDS
    if cp.client.get(f"/api/v1/namespaces/{RELEASE_NAMESPACE}", ok_missing=True) is None:
        cp.client.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                "metadata": {"name": RELEASE_NAMESPACE}})
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    token = cp.kubectl("create", "token", SERVICE_ACCOUNT, "-n", RELEASE_NAMESPACE,
                       "--duration=6h").stdout.strip()
    admin = yaml.safe_load(Path(cp.kubeconfig).read_text())
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": SERVICE_ACCOUNT, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": admin["clusters"][0]["name"],
                                                      "user": SERVICE_ACCOUNT}}],
        "current-context": "operator",
    }
    path = workdir / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def reset_peering(cp: ControlPlane) -> None:
    """Forget peers of earlier tests (a SIGKILLed operator leaves its record until it expires)."""
    cp.client.merge_patch(f"/apis/kopf.dev/v1/clusterkopfpeerings/{PEERING}", {"status": None}, ok_missing=True)


class OperatorProcess:
    """One `infergrid-operator` subprocess (its own process group), restartable with the same identity."""

    def __init__(self, kubeconfig: Path, workdir: Path, identity: str, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.kubeconfig, self.workdir, self.identity, self.args = kubeconfig, workdir, identity, args
        self.extra_env = env or {}
        self.log_path = workdir / f"operator-{identity}.log"
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self, wait: bool = True) -> OperatorProcess:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "POD_ID": self.identity, **self.extra_env}
        argv = [sys.executable, "-m", "infergrid.operator.main", "--peering", PEERING, "--bind", "127.0.0.1",
                "--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port),
                "--log-format", "plain", *self.args]
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts + 1}: {' '.join(argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        self.starts += 1
        if wait:
            wait_for(self.is_healthy, 60, f"operator {self.identity} /healthz")
        return self

    def is_alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def is_healthy(self) -> bool:
        if not self.is_alive():
            raise AssertionError(f"operator exited with {self.popen.returncode if self.popen else None}:\n"
                                 f"{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> dict[str, float]:
        """The operator's own Prometheus samples, `name{labels}` -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def kill(self) -> None:
        """SIGKILL the operator (no cleanup at all)."""
        if self.is_alive():
            os.killpg(self.pid, signal.SIGKILL)
            assert self.popen is not None
            self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.popen is not None and self.is_alive():
            terminate_pid(self.pid, timeout=10, group=True, popen=self.popen)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# ------------------------------------------------------------------ reading the cluster

def isvc_path(namespace: str, name: str = "") -> str:
    base = f"/apis/infergrid.dev/v1alpha1/namespaces/{namespace}/inferenceservices"
    return f"{base}/{name}" if name else base


def apply_isvc(cp: ControlPlane, namespace: str, name: str, spec: dict[str, Any]) -> None:
    """`kubectl apply` an InferenceService, as a user would."""
    doc = {"apiVersion": "infergrid.dev/v1alpha1", "kind": "InferenceService",
           "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    cp.kubectl("apply", "-f", "-", input=json.dumps(doc))


def get_isvc(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any] | None:
    return cp.client.get(isvc_path(namespace, name), ok_missing=True)


def condition(isvc: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for cond in ((isvc or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return cond
    return {}


CHILD_LISTS = {
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "Service": "/api/v1/namespaces/{ns}/services",
    "PodDisruptionBudget": "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
    "NetworkPolicy": "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
}


#: Children of one InferenceService without a PodMonitor: worker Deployment, headless and client Services,
#: PDB, worker NetworkPolicy; router Deployment, NetworkPolicy, ServiceAccount, Role, RoleBinding.
NUM_CHILDREN = 10


def children(cp: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    """Every object labelled as a child of the InferenceService `name`."""
    found = []
    for kind, path in CHILD_LISTS.items():
        listing = cp.client.get(path.format(ns=namespace), labelSelector=f"infergrid.dev/inferenceservice={name}")
        found += [{**item, "kind": kind} for item in (listing or {}).get("items", [])]
    return found


def worker_pods(cp: ControlPlane, namespace: str, name: str, component: str = "worker") -> list[dict[str, Any]]:
    listing = cp.client.get(f"/api/v1/namespaces/{namespace}/pods",
                            labelSelector=f"infergrid.dev/inferenceservice={name},app.kubernetes.io/component={component}")
    return [p for p in (listing or {}).get("items", []) if not p["metadata"].get("deletionTimestamp")]


def set_routers_ready(cp: ControlPlane, namespace: str, name: str) -> None:
    """Play the readiness probe for every running router pod of the service."""
    for pod in worker_pods(cp, namespace, name, component="router"):
        if (pod.get("status") or {}).get("podIP") and not any(
                c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or []):
            cp.set_pod_ready(namespace, pod["metadata"]["name"])


def set_workers_ready(cp: ControlPlane, namespace: str, name: str) -> int:
    """Play the readiness probe for every running worker pod (and, unasked, the router pods); returns how
    many workers are ready."""
    set_routers_ready(cp, namespace, name)
    ready = 0
    for pod in worker_pods(cp, namespace, name):
        if not (pod.get("status") or {}).get("podIP"):
            continue
        conds = {c["type"]: c["status"] for c in pod["status"].get("conditions") or []}
        if conds.get("Ready") != "True":
            cp.set_pod_ready(namespace, pod["metadata"]["name"])
        ready += 1
    return ready


def events_for(cp: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    listing = cp.client.get(f"/api/v1/namespaces/{namespace}/events",
                            fieldSelector=f"involvedObject.name={name},involvedObject.kind=InferenceService")
    return (listing or {}).get("items", [])


def decode_token_subject(token: str) -> str:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"]
