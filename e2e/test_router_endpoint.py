"""The endpoint as clients reach it: the client Service's ClusterIP (kube-proxy) -> router pods -> workers.

Real parts only: the test bed's control plane with kube-proxy in nftables mode inside the pod network
namespace, the operator as a subprocess, the pod runner running `infergrid-router` and
`infergrid-worker serve` at their pod IPs (the router with its own ServiceAccount's RBAC, watching
EndpointSlices; its API keys from a mounted Secret), and the official `openai` client.

The tests share one deployed service (3 workers, 2 routers, API keys on) and run in file order.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from isvc_support import OperatorProcess, condition, get_isvc, ready_pods, wait_for

from infergrid.testbed.controlplane import ControlPlane
from infergrid.testbed.demo import manifest
from infergrid.testbed.podrunner import PodRunner

pytestmark = pytest.mark.controlplane

READY_TIMEOUT = 300.0
KEYS = ("sk-team-a-first", "sk-team-a-second")


@dataclass
class Endpoint:
    cp: ControlPlane
    namespace: str
    name: str
    served_name: str
    address: str  # ClusterIP:80
    operator: OperatorProcess
    runner: PodRunner

    def client(self, key: str = KEYS[0], **kw: Any) -> openai.OpenAI:
        kw.setdefault("http_client", httpx.Client(trust_env=False, timeout=60))
        return openai.OpenAI(base_url=f"http://{self.address}/v1", api_key=key, **kw)

    def isvc(self) -> dict[str, Any]:
        obj = get_isvc(self.cp, self.namespace, self.name)
        assert obj is not None
        return obj


@pytest.fixture(scope="module")
def endpoint(isvc_crds: ControlPlane, namespace: str, runner: PodRunner, start_operator: Any,
             tiny_model: Path) -> Iterator[Endpoint]:
    operator = start_operator([namespace])
    isvc_crds.kubectl("-n", namespace, "create", "secret", "generic", "keys",
                      f"--from-literal=keys={KEYS[0]}\n{KEYS[1]}\n")
    doc = manifest(tiny_model)
    doc["metadata"]["namespace"] = namespace
    doc["spec"]["replicas"] = 3
    doc["spec"]["router"] = {"replicas": 2, "policy": "least-load",
                             "apiKeySecretRef": {"name": "keys", "key": "keys"}}
    name = doc["metadata"]["name"]
    isvc_crds.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))

    def ready() -> dict[str, Any] | None:
        assert operator.alive(), f"the operator died:\n{operator.log_tail()}"
        obj = get_isvc(isvc_crds, namespace, name)
        status = (obj or {}).get("status") or {}
        if condition(obj, "Ready").get("status") == "True" and status.get("readyReplicas") == 3 \
                and condition(obj, "RouterReady").get("reason") == "RouterReady":
            return obj
        return None

    try:
        wait_for(ready, READY_TIMEOUT, f"InferenceService {namespace}/{name} Ready with 3 workers", interval=0.5)
    except AssertionError:
        print(json.dumps((get_isvc(isvc_crds, namespace, name) or {}).get("status"), indent=2))
        print(isvc_crds.kubectl("get", "deployments,pods,svc,endpointslices", "-n", namespace, "-o", "wide",
                                check=False).stdout)
        for path in sorted(runner.workdir.rglob("*.log")):
            print(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        raise
    svc = isvc_crds.client.get(f"/api/v1/namespaces/{namespace}/services/{name}")
    assert svc is not None
    yield Endpoint(isvc_crds, namespace, name, doc["spec"]["model"]["servedName"],
                   f"{svc['spec']['clusterIP']}:80", operator, runner)


def test_the_service_selects_router_pods_only(endpoint: Endpoint) -> None:
    slices = endpoint.cp.client.get(f"/apis/discovery.k8s.io/v1/namespaces/{endpoint.namespace}/endpointslices",
                                    labelSelector=f"kubernetes.io/service-name={endpoint.name}")
    addresses = {a for s in (slices or {}).get("items", []) for e in s.get("endpoints") or [] for a in e["addresses"]}
    routers = ready_pods(endpoint.cp, endpoint.namespace,
                         f"infergrid.dev/inferenceservice={endpoint.name},app.kubernetes.io/component=router")
    assert len(routers) == 2
    assert addresses == {p["status"]["podIP"] for p in routers}


def test_openai_client_through_the_cluster_ip(endpoint: Endpoint) -> None:
    client = endpoint.client()
    assert [m.id for m in client.models.list().data] == [endpoint.served_name]

    done = client.completions.create(model=endpoint.served_name, prompt="Hello", max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens >= 1
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=endpoint.served_name, prompt="Hello", max_tokens=5, temperature=0, stream=True) if chunk.choices)
    assert streamed == done.choices[0].text  # greedy: the same text, token by token

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=endpoint.served_name, max_tokens=5, temperature=0,
                                          messages=messages)
    assert chat.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(
        model=endpoint.served_name, max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}, messages=messages))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content


def test_api_keys_are_required_and_the_request_id_is_kept(endpoint: Endpoint) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        endpoint.client("sk-wrong", max_retries=0).models.list()
    assert err.value.status_code == 401
    assert endpoint.client(KEYS[1]).models.list().data

    with httpx.Client(trust_env=False, timeout=30) as http:
        anonymous = http.post(f"http://{endpoint.address}/v1/completions",
                              json={"model": endpoint.served_name, "prompt": "Hi", "max_tokens": 2})
        assert anonymous.status_code == 401
        assert set(anonymous.json()["error"]) >= {"message", "type", "code"}  # OpenAI error JSON
        r = http.post(f"http://{endpoint.address}/v1/completions", headers={
            "Authorization": f"Bearer {KEYS[0]}", "X-Request-Id": "trace-123"},
            json={"model": endpoint.served_name, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "trace-123"


def test_keys_rotate_without_a_restart(endpoint: Endpoint) -> None:
    routers = ready_pods(endpoint.cp, endpoint.namespace,
                         f"infergrid.dev/inferenceservice={endpoint.name},app.kubernetes.io/component=router")
    before = {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"] for p in routers}
    endpoint.cp.kubectl("-n", endpoint.namespace, "patch", "secret", "keys", "-p",
                        json.dumps({"stringData": {"keys": "sk-rotated\n"}}))

    def rotated() -> bool:
        # both router pods must have picked it up: ask several times (kube-proxy spreads connections)
        for _ in range(6):
            try:
                endpoint.client("sk-rotated", max_retries=0,
                                http_client=httpx.Client(trust_env=False, timeout=10)).models.list()
            except openai.AuthenticationError:
                return False
        return True

    wait_for(rotated, 30, "the rotated key accepted by every router pod", interval=0.5)
    with pytest.raises(openai.AuthenticationError):
        endpoint.client(KEYS[0], max_retries=0).models.list()
    after = {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"] for p in ready_pods(
        endpoint.cp, endpoint.namespace,
        f"infergrid.dev/inferenceservice={endpoint.name},app.kubernetes.io/component=router")}
    assert after == before  # same pods, no restarts


def test_router_rolls_under_load_with_zero_failed_requests(endpoint: Endpoint) -> None:
    """`kubectl apply` of a changed router spec while clients send requests through the ClusterIP."""
    key = "sk-rotated"
    results: list[str] = []
    stop = threading.Event()

    def load() -> None:
        client = endpoint.client(key, max_retries=0)
        while not stop.is_set():
            try:
                out = client.completions.create(model=endpoint.served_name, prompt="Hi", max_tokens=3)
                results.append("ok" if out.choices else "empty")
            except Exception as e:  # noqa: BLE001 - every failure is recorded and asserted on
                results.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: len(results) >= 10, 60, "the load running")
    old = {p["metadata"]["name"] for p in ready_pods(
        endpoint.cp, endpoint.namespace,
        f"infergrid.dev/inferenceservice={endpoint.name},app.kubernetes.io/component=router")}
    endpoint.cp.kubectl("-n", endpoint.namespace, "patch", "inferenceservice", endpoint.name, "--type=merge",
                        "-p", json.dumps({"spec": {"router": {"policy": "round-robin"}}}))

    def rolled() -> bool:
        pods = endpoint.cp.client.get(f"/api/v1/namespaces/{endpoint.namespace}/pods", labelSelector=(
            f"infergrid.dev/inferenceservice={endpoint.name},app.kubernetes.io/component=router")) or {}
        names = {p["metadata"]["name"] for p in pods.get("items", [])}
        ready = {p["metadata"]["name"] for p in ready_pods(
            endpoint.cp, endpoint.namespace,
            f"infergrid.dev/inferenceservice={endpoint.name},app.kubernetes.io/component=router")}
        return not (names & old) and len(ready) == 2

    wait_for(rolled, 180, "the router Deployment rolled to new pods", interval=0.5)
    time.sleep(2)  # requests keep flowing through the new pods
    stop.set()
    for t in threads:
        t.join(60)
    failures = [r for r in results if r != "ok"]
    print(f"{len(results)} requests during the roll, {len(failures)} failed")
    assert len(results) >= 20
    assert failures == []
