"""Observability, live: Debian's Prometheus discovers the worker and router pods through the test bed's
API server (the pod role of Kubernetes SD, which Debian's build lacks, played by
testbed.prometheus.PodDiscovery; relabeled with the PodMonitors' selectors) and scrapes them and the
operator while a bounded load runs through the official `openai` client against the service's
ClusterIP (kube-proxy -> router -> worker), the service autoscaled. Then a SIGSTOPped worker is ejected
by the router (the chart's InferGridRouterEjecting alert fires), every panel query of every dashboard,
with its template variables filled, returns data from that Prometheus, and killing every worker of
the service makes the chart's InferGridNoReadyWorkers alert go pending.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from isvc_support import REPO, OperatorProcess, condition, get_isvc, ready_pods, wait_for

from infergrid.testbed.controlplane import ControlPlane
from infergrid.testbed.demo import manifest
from infergrid.testbed.kubeapi import KubeClient
from infergrid.testbed.podrunner import PodRunner
from infergrid.testbed.procs import free_port
from infergrid.testbed.prometheus import (
    PodDiscovery,
    Prometheus,
    pod_scrape_job,
    prometheus_config,
    static_scrape_job,
)

pytestmark = pytest.mark.controlplane

DASHBOARDS_DIR = REPO / "charts" / "infergrid" / "dashboards"
RULES = REPO / "charts" / "infergrid" / "rules" / "infergrid.rules.yaml"
# The dashboards whose every panel must show data here (all of them). fleet.json's `pod` is a router pod.
LIVE_DASHBOARDS = ("overview.json", "engine.json", "operator.json", "fleet.json")
RATE_INTERVAL = "30s"  # what $__rate_interval stands for (Grafana: at least 4 scrape intervals)
READY_TIMEOUT = 240.0
NUM_REQUESTS, CONCURRENCY = 24, 4
AUTOSCALING = {"minReplicas": 1, "maxReplicas": 2}  # autoscaled (the Fleet's autoscaler panels), small bounds


def _load_dashboards_tool() -> Any:
    spec = importlib.util.spec_from_file_location("dashboards_tool", REPO / "tools" / "dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("dashboards_tool", module)
    spec.loader.exec_module(module)
    return module


dashboards = _load_dashboards_tool()


@dataclass
class Observed:
    """The deployed service, its Prometheus, and when the load ran."""

    cp: ControlPlane
    namespace: str
    name: str
    served_name: str
    pod_name: str
    pod_ip: str
    router_pod: str
    address: str  # the client Service's ClusterIP:80
    runner: PodRunner
    operator: OperatorProcess
    prometheus: Prometheus
    applied_at: float
    load_seconds: float
    num_ok: int
    ejecting_alert: dict[str, Any]
    ejected_after: float  # seconds from the SIGSTOP to the alert


def start_prometheus(cp: ControlPlane, namespace: str, operator_port: int,
                     workdir: Path) -> tuple[Prometheus, PodDiscovery]:
    """Prometheus in this (pod) network namespace: the namespace's worker and router pods discovered
    through the API server, the operator's /metrics as a static target, and the chart's alert rules."""
    discovery = PodDiscovery(KubeClient(cp.kubeconfig), workdir / "pods.json", namespaces=[namespace]).start()
    config = prometheus_config([
        pod_scrape_job("infergrid-workers", discovery.path),
        pod_scrape_job("infergrid-routers", discovery.path, component="router"),
        static_scrape_job("infergrid-operator", [f"127.0.0.1:{operator_port}"]),
    ], rule_files=[RULES])
    try:
        return Prometheus(workdir / "prometheus", config).start(), discovery
    except BaseException:
        discovery.stop()
        raise


def run_load(base_url: str, model: str, num_requests: int = NUM_REQUESTS) -> tuple[int, float]:
    """`num_requests` completions and chat completions, CONCURRENCY at a time, through the openai
    client. Prompts repeat a phrase (n-gram drafts) and share a prefix (prefix-cache hits)."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120,
                           http_client=openai.DefaultHttpxClient(trust_env=False))
    prefix = "The quick brown fox jumps over the lazy dog. " * 4
    num_ok, lock, next_index = 0, threading.Lock(), [0]

    def work() -> None:
        nonlocal num_ok
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= num_requests:
                return
            if i % 3 == 2:
                out = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": f"{prefix} Request {i}."}],
                    max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
                ok = bool(out.choices[0].message.content)
            else:
                out = client.completions.create(model=model, prompt=f"{prefix} one two three one two three {i}",
                                                max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
                ok = bool(out.choices[0].text)
            with lock:
                num_ok += ok

    t0 = time.monotonic()
    threads = [threading.Thread(target=work) for _ in range(CONCURRENCY)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        client.close()
    return num_ok, time.monotonic() - t0


@pytest.fixture(scope="module")
def observed(isvc_crds: ControlPlane, namespace: str, runner: PodRunner, start_operator: Any, tiny_model: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    """Operator (with /metrics) and Prometheus first, then the service applied, Ready, and loaded."""
    operator = start_operator([namespace], metrics_port=free_port())
    prom, discovery = start_prometheus(isvc_crds, namespace, operator.metrics_port,
                                       tmp_path_factory.mktemp("observe"))
    try:
        wait_for(lambda: [t for t in prom.active_targets("infergrid-operator") if t["health"] == "up"], 30,
                 "Prometheus scraping the operator")
        doc = manifest(tiny_model)
        doc["metadata"]["namespace"] = namespace
        doc["spec"]["engine"]["speculative"] = {"method": "ngram", "numTokens": 3}
        doc["spec"].pop("replicas", None)
        doc["spec"]["autoscaling"] = AUTOSCALING
        name, served_name = doc["metadata"]["name"], doc["spec"]["model"]["servedName"]
        applied_at = time.time()
        isvc_crds.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))

        def ready() -> dict[str, Any] | None:
            assert operator.alive(), f"the operator died:\n{operator.log_tail()}"
            obj = get_isvc(isvc_crds, namespace, name)
            if condition(obj, "Ready").get("status") == "True" and (obj or {})["status"].get("readyReplicas") \
                    and condition(obj, "RouterReady").get("reason") == "RouterReady":
                return obj
            return None

        isvc = wait_for(ready, READY_TIMEOUT, f"InferenceService {namespace}/{name} Ready", interval=0.5)
        (pod,) = ready_pods(isvc_crds, namespace, isvc["status"]["selector"])
        pod_name, pod_ip = pod["metadata"]["name"], pod["status"]["podIP"]
        (router,) = ready_pods(isvc_crds, namespace,
                               f"infergrid.dev/inferenceservice={name},app.kubernetes.io/component=router")
        router_pod = router["metadata"]["name"]
        for job, pod in (("infergrid-workers", pod_name), ("infergrid-routers", router_pod)):
            wait_for(lambda job=job, pod=pod: [t for t in prom.active_targets(job)
                                               if t["health"] == "up" and t["labels"].get("pod") == pod], 30,
                     f"Prometheus scraping pod {pod} (Kubernetes SD, job {job})")
        svc = isvc_crds.client.get(f"/api/v1/namespaces/{namespace}/services/{name}")
        assert svc is not None
        address = f"{svc['spec']['clusterIP']}:80"
        num_ok, load_seconds = run_load(f"http://{address}/v1", served_name)
        alert, ejected_after = eject_by_stopping(runner, prom, namespace, name, pod_name)
        time.sleep(3)  # a few scrapes after the worker is back
        yield Observed(cp=isvc_crds, namespace=namespace, name=name, served_name=served_name, pod_name=pod_name,
                       pod_ip=pod_ip, router_pod=router_pod, address=address, runner=runner, operator=operator,
                       prometheus=prom, applied_at=applied_at, load_seconds=load_seconds, num_ok=num_ok,
                       ejecting_alert=alert, ejected_after=ejected_after)
    finally:
        print(f"--- prometheus log tail\n{prom.proc.log_tail(20) if prom.proc else ''}")
        prom.stop()
        discovery.stop()
        discovery.client.close()


def eject_by_stopping(runner: PodRunner, prom: Prometheus, namespace: str, name: str,
                      pod_name: str) -> tuple[dict[str, Any], float]:
    """SIGSTOP the worker (wedged: its socket accepts, nothing answers) until the router's probe times out
    and ejects it and the chart's InferGridRouterEjecting alert fires; then SIGCONT and wait until the
    router admits it again. Returns the alert and the seconds from the stop to it."""
    process = runner.find(namespace, pod_name)
    assert process is not None and process.pid is not None

    def ejecting() -> list[dict[str, Any]]:
        return [a for a in prom.alerts() if a["labels"].get("alertname") == "InferGridRouterEjecting"
                and a["labels"].get("namespace") == namespace and a["labels"].get("service") == name
                and a["state"] == "firing"]

    assert ejecting() == [], "the router is ejecting before any fault"
    stopped_at = time.monotonic()
    os.killpg(process.pid, signal.SIGSTOP)
    try:
        (alert, *_) = wait_for(ejecting, 30, "InferGridRouterEjecting firing for the stopped worker", interval=0.25)
        seconds = time.monotonic() - stopped_at
    finally:
        os.killpg(process.pid, signal.SIGCONT)
    readmitted = f'min(infergrid:router_ready_workers{{namespace="{namespace}", service="{name}"}}) >= 1'
    wait_for(lambda: prom.query(readmitted), 30, "the router admitting the worker again", interval=0.25)
    return alert, seconds


def has_data(series: list[dict[str, Any]]) -> bool:
    """Some series holds a finite value (what a Grafana panel draws)."""
    for s in series:
        values = s.get("values") or ([s["value"]] if "value" in s else [])
        if any(math.isfinite(float(v)) for _, v in values):
            return True
    return False


def test_prometheus_discovers_the_worker_through_the_api_server(observed: Observed) -> None:
    (target,) = [t for t in observed.prometheus.active_targets("infergrid-workers")
                 if t["labels"].get("pod") == observed.pod_name]
    assert target["scrapeUrl"] == f"http://{observed.pod_ip}:8000/metrics"
    assert target["labels"]["namespace"] == observed.namespace and target["labels"]["service"] == observed.name
    (router,) = [t for t in observed.prometheus.active_targets("infergrid-routers")
                 if t["labels"].get("pod") == observed.router_pod]
    assert router["scrapeUrl"].endswith(":8080/metrics") and router["labels"]["service"] == observed.name
    groups = {g["name"] for g in observed.prometheus.rule_groups()}
    assert groups == {"infergrid-workers", "infergrid-control-plane"}
    print(f"load: {observed.num_ok}/{NUM_REQUESTS} requests ok in {observed.load_seconds:.1f}s")
    assert observed.num_ok == NUM_REQUESTS
    served = observed.prometheus.query(
        f'sum(vllm:request_success_total{{namespace="{observed.namespace}", service="{observed.name}"}})')
    assert served and float(served[0]["value"][1]) >= NUM_REQUESTS
    # the load went through the router: it counts every request as sent to the worker
    routed = observed.prometheus.query(
        f'sum(infergrid:router_requests_total{{namespace="{observed.namespace}", service="{observed.name}", '
        f'worker="{observed.pod_ip}:8000", outcome="2xx"}})')
    assert routed and float(routed[0]["value"][1]) >= NUM_REQUESTS, routed
    decisions = observed.prometheus.query(
        f'sum by (direction, reason) (infergrid:autoscaler_decisions_total{{namespace="{observed.namespace}", '
        f'service="{observed.name}"}}) > 0')  # each outcome's series exists from the start, at 0
    print("autoscaler decisions:", {f"{d['metric']['direction']}/{d['metric']['reason']}": d["value"][1]
                                    for d in decisions})
    assert decisions


def test_a_stopped_worker_is_ejected_and_the_router_ejecting_alert_fires(observed: Observed) -> None:
    alert = observed.ejecting_alert
    print(f"InferGridRouterEjecting firing {observed.ejected_after:.1f}s after the SIGSTOP: {alert['labels']}")
    assert alert["labels"]["worker"] == f"{observed.pod_ip}:8000"
    assert alert["labels"]["reason"] in ("timeout", "not_ready", "scrape_failed")
    assert alert["labels"]["severity"] == "warning"
    assert alert["annotations"]["runbook"] == "docs/runbook.md#infergridrouterejecting"


@pytest.mark.parametrize("dashboard", LIVE_DASHBOARDS)
def test_every_panel_query_returns_data(observed: Observed, dashboard: str) -> None:
    model = json.loads((DASHBOARDS_DIR / dashboard).read_text())
    pod = observed.router_pod if dashboard == "fleet.json" else observed.pod_name  # fleet: the router's panels
    variables = {"namespace": observed.namespace, "service": observed.name, "pod": pod, "datasource": "prometheus"}
    queries = dashboards.panel_queries(model)
    assert queries, f"{dashboard} has no panel queries"
    end = time.time()
    empty = []
    for title, ref, expr in queries:
        promql = dashboards.fill(expr, variables, rate_interval=RATE_INTERVAL)
        series = observed.prometheus.query_range(promql, observed.applied_at, end, step=1.0)
        if not has_data(series):
            empty.append(f"{title} [{ref}]: {promql}")
    print(f"{dashboard}: {len(queries) - len(empty)}/{len(queries)} panel queries with data")
    # the same check on a metric nobody exports (vLLM v0's swapped requests) finds no data
    unexported = dashboards.fill('sum by (pod) (vllm:num_requests_swapped{namespace=~"$namespace", pod=~"$pod"})',
                                 variables)
    assert not has_data(observed.prometheus.query_range(unexported, observed.applied_at, end, step=1.0))
    assert not empty, f"{dashboard}: panel queries without data:\n" + "\n".join(empty)


def test_killing_every_worker_makes_the_no_ready_workers_alert_pending(observed: Observed) -> None:
    prom = observed.prometheus

    def our_alerts() -> list[dict[str, Any]]:
        return [a for a in prom.alerts() if a["labels"].get("alertname") == "InferGridNoReadyWorkers"
                and a["labels"].get("namespace") == observed.namespace
                and a["labels"].get("service") == observed.name]

    assert our_alerts() == [], "the alert is active while the worker is ready"
    pods = ready_pods(observed.cp, observed.namespace, f"infergrid.dev/inferenceservice={observed.name}")
    assert pods
    killed_at = time.monotonic()
    for pod in pods:
        process = observed.runner.find(observed.namespace, pod["metadata"]["name"])
        assert process is not None and process.pid is not None
        os.killpg(process.pid, signal.SIGKILL)  # the worker's whole process group, no drain
    alerts = wait_for(our_alerts, 60, "InferGridNoReadyWorkers pending or firing", interval=0.25)
    seconds = time.monotonic() - killed_at
    print(f"InferGridNoReadyWorkers {alerts[0]['state']} {seconds:.1f}s after the kill")
    assert alerts[0]["state"] in ("pending", "firing")
    assert alerts[0]["labels"]["severity"] == "critical"
    assert alerts[0]["annotations"]["runbook"] == "docs/runbook.md#infergridnoreadyworkers"
    # the pod runner restarts the worker; once it is ready again the alert clears
    wait_for(lambda: not our_alerts(), READY_TIMEOUT, "InferGridNoReadyWorkers to clear after the restart",
             interval=0.5)
