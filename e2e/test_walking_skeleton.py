"""Walking skeleton: one InferenceService YAML becomes a worker pod that answers OpenAI requests.

Real parts only: the test bed's control plane (API server with the CRD's schema and CEL rules,
controller-manager for Deployments and garbage collection, scheduler, KWOK GPU nodes), the operator as
a subprocess, the pod runner starting `infergrid-worker serve` bound to the pod IP KWOK assigned, and
the official `openai` client talking to that IP inside the pod network namespace.

The tests share one deployed service (module fixtures) and run in file order; the last one deletes it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from isvc_support import (
    OperatorProcess,
    condition,
    get_isvc,
    listening_pids,
    process_tree,
    prometheus_samples,
    ready_pods,
    scrape,
    wait_for,
)

from infergrid.testbed.controlplane import ControlPlane
from infergrid.testbed.demo import manifest
from infergrid.testbed.podrunner import PodRunner
from infergrid.testbed.procs import pid_alive

pytestmark = pytest.mark.controlplane

READY_TIMEOUT = 240.0  # apply -> Ready, including the tiny model's load on a busy 2-core machine
GC_TIMEOUT = 60.0
PROMPT = "The capital of France is"
MAX_TOKENS = 8


@dataclass
class Deployed:
    """The applied examples/tiny.yaml and what serves it."""

    cp: ControlPlane
    namespace: str
    name: str
    served_name: str
    source: str
    isvc: dict[str, Any]
    pod: dict[str, Any]
    ip: str
    runner: PodRunner
    operator: OperatorProcess
    ready_seconds: float


@pytest.fixture(scope="module")
def deployed(isvc_crds: ControlPlane, namespace: str, runner: PodRunner, start_operator: Any,
             tiny_model: Path) -> Deployed:
    """examples/tiny.yaml (source rewritten to the tiny checkpoint) applied and Ready."""
    operator = start_operator([namespace])
    doc = manifest(tiny_model)  # the same rewrite `make demo` does
    doc["metadata"]["namespace"] = namespace
    name, served_name = doc["metadata"]["name"], doc["spec"]["model"]["servedName"]
    t0 = time.monotonic()
    isvc_crds.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))

    def ready() -> dict[str, Any] | None:
        assert operator.alive(), f"the operator died:\n{operator.log_tail()}"
        obj = get_isvc(isvc_crds, namespace, name)
        if condition(obj, "Ready").get("status") == "True" and (obj or {})["status"].get("readyReplicas"):
            return obj
        return None

    try:
        isvc = wait_for(ready, READY_TIMEOUT, f"InferenceService {namespace}/{name} Ready", interval=0.5)
    except AssertionError:
        _explain(isvc_crds, namespace, name, runner, operator)
        raise
    ready_seconds = time.monotonic() - t0
    pods = ready_pods(isvc_crds, namespace, isvc["status"]["selector"])
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return Deployed(cp=isvc_crds, namespace=namespace, name=name, served_name=served_name,
                    source=doc["spec"]["model"]["source"], isvc=isvc, pod=pods[0], ip=pods[0]["status"]["podIP"],
                    runner=runner, operator=operator, ready_seconds=ready_seconds)


def _explain(cp: ControlPlane, namespace: str, name: str, runner: PodRunner, operator: OperatorProcess) -> None:
    """Print what explains a service that never became Ready."""
    print(json.dumps((get_isvc(cp, namespace, name) or {}).get("status"), indent=2))
    print(cp.kubectl("get", "deployments,pods", "-n", namespace, "-o", "wide", check=False).stdout)
    print(f"--- operator log\n{operator.log_tail(60)}")
    for path in sorted(runner.workdir.rglob("*.log")):
        print(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))


def test_status_reports_ready_replicas_endpoint_and_selector(deployed: Deployed) -> None:
    status = deployed.isvc["status"]
    print(f"apply -> Ready: {deployed.ready_seconds:.1f}s")
    assert status["replicas"] == 1
    assert status["readyReplicas"] == 1
    assert status["endpoint"] == f"http://{deployed.name}.{deployed.namespace}.svc:80"
    assert status["observedGeneration"] == deployed.isvc["metadata"]["generation"]
    assert condition(deployed.isvc, "WorkersReady").get("status") == "True"
    # the selector (scale subresource) selects exactly the pod that serves
    labels = deployed.pod["metadata"]["labels"]
    for term in status["selector"].split(","):
        key, _, value = term.partition("=")
        assert labels.get(key) == value, (term, labels)


def test_completion_comes_from_the_worker_bound_to_the_pod_ip(deployed: Deployed) -> None:
    pod_name = deployed.pod["metadata"]["name"]
    process = deployed.runner.find(deployed.namespace, pod_name)
    assert process is not None and process.pid is not None, f"the pod runner runs no process for {pod_name}"
    # the only listener on POD_IP:8000 is the pod's own `infergrid-worker serve` (or a child of it)
    listeners = listening_pids(deployed.ip, 8000)
    assert listeners, f"nothing listens on {deployed.ip}:8000"
    assert listeners <= process_tree(process.pid), (listeners, process.pid)
    before = sum(prometheus_samples(scrape(deployed.ip), "vllm:request_success_total").values())

    client = openai.OpenAI(base_url=f"http://{deployed.ip}:8000/v1", api_key="unused", max_retries=0,
                           timeout=120, http_client=openai.DefaultHttpxClient(trust_env=False))
    try:
        completion = client.completions.create(model=deployed.served_name, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                               temperature=0, extra_body={"ignore_eos": True})
    finally:
        client.close()

    print(f"completion: {PROMPT!r} -> {completion.choices[0].text!r}")
    assert completion.model == deployed.served_name
    assert completion.choices[0].text, completion
    assert completion.usage is not None
    assert completion.usage.completion_tokens == MAX_TOKENS
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + MAX_TOKENS

    after = prometheus_samples(scrape(deployed.ip), "vllm:request_success_total")
    assert sum(after.values()) == before + 1, after
    assert any(f'model_name="{deployed.served_name}"' in series for series in after), after
    assert process.pid is not None and deployed.runner.find(deployed.namespace, pod_name) is process
    log = process.log_path.read_text(errors="replace")
    assert "POST /v1/completions" in log, log[-2000:]


def test_kubectl_get_shows_the_printer_columns(deployed: Deployed) -> None:
    out = deployed.cp.kubectl("get", "inferenceservices", "-n", deployed.namespace).stdout
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "MODEL", "REPLICAS", "READY", "ENDPOINT", "AGE"], out
    assert row.split()[:5] == [deployed.name, deployed.source, "1", "1",
                               f"http://{deployed.name}.{deployed.namespace}.svc:80"], out


@pytest.mark.parametrize(("spec", "field"), [
    ({"model": {"servedName": "x"}}, "spec.model.source"),
    ({"model": {"source": "file:///models/x"}, "replicas": -1}, "spec.replicas"),
    ({"model": {"source": "file:///models/x"}, "engine": {"tensorParallelSize": 3}},
     "spec.engine.tensorParallelSize"),
], ids=["no-model-source", "negative-replicas", "tp-3"])
def test_invalid_specs_are_refused_naming_the_field(isvc_crds: ControlPlane, namespace: str,
                                                    spec: dict[str, Any], field: str) -> None:
    doc = {"apiVersion": "infergrid.dev/v1alpha1", "kind": "InferenceService",
           "metadata": {"name": "refused", "namespace": namespace}, "spec": spec}
    result = isvc_crds.kubectl("apply", "-f", "-", input=json.dumps(doc), check=False)
    assert result.returncode != 0, f"accepted: {spec}"
    assert field in result.stderr, result.stderr
    assert get_isvc(isvc_crds, namespace, "refused") is None


def test_worker_deployment_is_owned_and_garbage_collected(deployed: Deployed) -> None:
    """Runs last: deleting the InferenceService cascades to its Deployment (and the worker stops)."""
    cp, ns = deployed.cp, deployed.namespace
    deployment_path = f"/apis/apps/v1/namespaces/{ns}/deployments/{deployed.name}-worker"
    deployment = cp.client.get(deployment_path)
    owners = deployment["metadata"].get("ownerReferences") or []
    assert [(o["kind"], o["name"], o["uid"], o.get("controller")) for o in owners] == [
        ("InferenceService", deployed.name, deployed.isvc["metadata"]["uid"], True)], owners

    process = deployed.runner.find(ns, deployed.pod["metadata"]["name"])
    assert process is not None and process.pid is not None
    worker_pid = process.pid
    t0 = time.monotonic()
    cp.kubectl("delete", "inferenceservice", deployed.name, "-n", ns, "--wait=false")
    wait_for(lambda: cp.client.get(deployment_path, ok_missing=True) is None, GC_TIMEOUT,
             "the garbage collector to delete the worker Deployment")
    print(f"InferenceService deleted -> Deployment gone: {time.monotonic() - t0:.1f}s")
    wait_for(lambda: process.finished.is_set() and not pid_alive(worker_pid), GC_TIMEOUT,
             "the worker process to stop after its pod was deleted")
    wait_for(lambda: not ready_pods(cp, ns, deployed.isvc["status"]["selector"]), GC_TIMEOUT,
             "the worker pods to go away")
