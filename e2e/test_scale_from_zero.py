"""Scale from zero through the endpoint: a request to a service with no workers is held by the router,
the autoscaler sees the held request in the router's metrics and adds a worker, and the request
completes.

Real parts only: kube-proxy's ClusterIP, `infergrid-router` pods, the operator's autoscaler scraping them,
the pod runner starting the worker, the official `openai` client. Then the idle service goes back to zero.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from isvc_support import condition, get_isvc, wait_for

from infergrid.testbed.controlplane import ControlPlane
from infergrid.testbed.demo import manifest
from infergrid.testbed.podrunner import PodRunner

pytestmark = pytest.mark.controlplane


def test_a_held_request_wakes_the_service_from_zero_and_completes(
        isvc_crds: ControlPlane, namespace: str, runner: PodRunner, start_operator: Any, tiny_model: Path) -> None:
    cp = isvc_crds
    operator = start_operator([namespace])
    doc = manifest(tiny_model)
    doc["metadata"]["namespace"] = namespace
    doc["spec"].pop("replicas", None)
    doc["spec"]["autoscaling"] = {"minReplicas": 0, "maxReplicas": 2, "scaleDownDelaySeconds": 5}
    name = doc["metadata"]["name"]
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))

    def idle_with_router() -> dict[str, Any] | None:
        assert operator.alive(), operator.log_tail()
        obj = get_isvc(cp, namespace, name)
        status = (obj or {}).get("status") or {}
        if status.get("replicas") == 0 and condition(obj, "RouterReady").get("status") == "True":
            return obj
        return None

    wait_for(idle_with_router, 180, "a router and zero workers", interval=0.5)
    cluster_ip = cp.client.get(f"/api/v1/namespaces/{namespace}/services/{name}")["spec"]["clusterIP"]
    client = openai.OpenAI(base_url=f"http://{cluster_ip}/v1", api_key="none", max_retries=0,
                           http_client=httpx.Client(trust_env=False, timeout=120))

    started = time.monotonic()
    out = client.completions.create(model=doc["spec"]["model"]["servedName"], prompt="Hello", max_tokens=4)
    waited = time.monotonic() - started
    print(f"held request completed after {waited:.1f}s (scale from zero + worker start)")
    assert out.choices and out.usage.completion_tokens >= 1

    obj = get_isvc(cp, namespace, name)
    assert obj["spec"]["replicas"] >= 1
    # a wake, and not one asked for by the annotation (this test never sets it): the router's held request
    assert obj["status"]["lastScaleReason"] == "wake"
    assert "infergrid.dev/wake" not in (obj["metadata"].get("annotations") or {})
    events = cp.client.get(f"/api/v1/namespaces/{namespace}/events") or {}
    reasons = [(e["reason"], e["message"]) for e in events.get("items", [])
               if e["involvedObject"].get("name") == name]
    assert any("scal" in reason.lower() for reason, _ in reasons), json.dumps(reasons)

    # idle again: back to zero after the delay
    wait_for(lambda: (get_isvc(cp, namespace, name) or {}).get("spec", {}).get("replicas") == 0, 120,
             "scale back to zero when idle", interval=1)
