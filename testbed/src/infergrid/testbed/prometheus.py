"""Debian's Prometheus as a managed test-bed process, discovering pods through the test bed's API server.

    discovery = PodDiscovery(cp.client, workdir / "pods.json", namespaces=[ns]).start()
    prom = Prometheus(workdir, prometheus_config([
        pod_scrape_job("infergrid-workers", discovery.path),
        static_scrape_job("infergrid-operator", ["127.0.0.1:9100"]),
    ], rule_files=[RULES])).start()
    prom.query('sum(vllm:num_requests_running)')

NOTE: Debian builds Prometheus without Kubernetes service discovery (its promtool refuses
`kubernetes_sd_configs`), so `PodDiscovery` plays the pod role of kubernetes_sd: it lists pods from the
API server and writes one file_sd target per container port, carrying the same `__meta_kubernetes_*`
labels. The job's relabel_configs are therefore the ones a Prometheus with Kubernetes SD would use,
and they mirror the operator's worker PodMonitor (builders/monitoring.py): keep pods labelled
`app.kubernetes.io/component=<component>` on the container port named `http`, and copy namespace, pod
and the `infergrid.dev/inferenceservice` label (as `service`) onto every series. Pod IPs answer only
inside the pod network namespace, so Prometheus must run inside it (`testbed.cli exec` runs tests there).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from infergrid.testbed.kubeapi import ApiError, KubeClient
from infergrid.testbed.procs import ManagedProcess, free_port, spawn

INSTALL_HINT = "install Debian's prometheus package (`make prometheus-tools`, i.e. apt-get install prometheus)"
META = "__meta_kubernetes_"
ISVC_LABEL_META = f"{META}pod_label_infergrid_dev_inferenceservice"
COMPONENT_LABEL_META = f"{META}pod_label_app_kubernetes_io_component"


class PrometheusError(RuntimeError):
    """Prometheus is missing, did not start, or answered a query with an error."""


def find_binary(name: str = "prometheus") -> str:
    """Path of `prometheus` or `promtool` (PATH, then /usr/bin); PrometheusError saying how to install it."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
    if found is None:
        raise PrometheusError(f"{name} not found: {INSTALL_HINT}")
    return found


def pod_scrape_job(job: str, targets_file: Path, *, component: str = "worker",
                   port_name: str = "http") -> dict[str, Any]:
    """A pod-role job (targets from `PodDiscovery`) with the worker PodMonitor's selector and relabelings."""
    return {
        "job_name": job,
        "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}],
        "relabel_configs": [
            {"source_labels": [COMPONENT_LABEL_META], "regex": component, "action": "keep"},
            {"source_labels": [f"{META}pod_container_port_name"], "regex": port_name, "action": "keep"},
            {"source_labels": [f"{META}pod_phase"], "regex": "(Failed|Succeeded)", "action": "drop"},
            {"source_labels": [f"{META}namespace"], "target_label": "namespace"},
            {"source_labels": [f"{META}pod_name"], "target_label": "pod"},
            {"source_labels": [f"{META}pod_container_name"], "target_label": "container"},
            {"source_labels": [ISVC_LABEL_META], "target_label": "service"},
        ],
    }


def _label_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def pod_targets(pods: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """file_sd target groups for pods, one per container port, with kubernetes_sd's pod-role labels."""
    groups = []
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status") or {}
        ip = status.get("podIP")
        if not ip or meta.get("deletionTimestamp"):
            continue
        conds = {c["type"]: c["status"] for c in status.get("conditions") or []}
        common = {f"{META}namespace": meta["namespace"], f"{META}pod_name": meta["name"],
                  f"{META}pod_ip": ip, f"{META}pod_phase": status.get("phase", ""),
                  f"{META}pod_ready": str(conds.get("Ready") == "True").lower(),
                  f"{META}pod_node_name": pod["spec"].get("nodeName", ""), f"{META}pod_uid": meta.get("uid", "")}
        for key, value in (meta.get("labels") or {}).items():
            common[f"{META}pod_label_{_label_name(key)}"] = value
            common[f"{META}pod_labelpresent_{_label_name(key)}"] = "true"
        for container in pod["spec"].get("containers", []):
            for port in container.get("ports") or []:
                labels = {**common, f"{META}pod_container_name": container["name"],
                          f"{META}pod_container_port_name": port.get("name", ""),
                          f"{META}pod_container_port_number": str(port["containerPort"]),
                          f"{META}pod_container_port_protocol": port.get("protocol", "TCP")}
                groups.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": labels})
    return groups


class PodDiscovery:
    """Keeps a file_sd file in step with the pods the API server lists (polled every `interval`)."""

    def __init__(self, client: KubeClient, path: Path, *, namespaces: Sequence[str] = (),
                 interval: float = 0.5) -> None:
        self.client, self.path, self.namespaces, self.interval = client, Path(path), tuple(namespaces), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pod-discovery", daemon=True)
        self._written: str | None = None

    def start(self) -> PodDiscovery:
        """Write the first snapshot, then keep it fresh in a background thread."""
        self.refresh()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def refresh(self) -> None:
        """List the pods once and rewrite the file if the targets changed."""
        pods: list[dict[str, Any]] = []
        for path in ([f"/api/v1/namespaces/{ns}/pods" for ns in self.namespaces] or ["/api/v1/pods"]):
            pods += (self.client.get(path) or {}).get("items", [])
        text = json.dumps(pod_targets(pods), indent=1, sort_keys=True)
        if text != self._written:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)  # Prometheus never reads a half-written file
            self._written = text

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except (ApiError, httpx.HTTPError, OSError):
                pass  # e.g. the API server restarting: keep the last targets, try again


def static_scrape_job(job: str, targets: Iterable[str], *, honor_labels: bool = True) -> dict[str, Any]:
    """A job over fixed host:port targets (e.g. the operator's --metrics-port); `honor_labels` keeps the
    target's own namespace/service labels, as the chart's operator ServiceMonitor does."""
    return {"job_name": job, "honor_labels": honor_labels, "static_configs": [{"targets": list(targets)}]}


def prometheus_config(jobs: Sequence[dict[str, Any]], *, rule_files: Sequence[Path] = (),
                      interval: str = "1s") -> dict[str, Any]:
    """A whole prometheus.yml: scrape and rule evaluation every `interval`."""
    return {"global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "rule_files": [str(p) for p in rule_files], "scrape_configs": list(jobs)}


class Prometheus:
    """One Prometheus server on 127.0.0.1 (own process group, TSDB and config in `workdir`)."""

    def __init__(self, workdir: Path, config: dict[str, Any], *, port: int | None = None,
                 binary: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.config = config
        self.port = port or free_port()
        self.binary = binary or find_binary()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = self.workdir / "prometheus.yml"
        self.proc: ManagedProcess | None = None
        self._http = httpx.Client(base_url=self.url, timeout=10.0, trust_env=False)

    def start(self, timeout: float = 60.0) -> Prometheus:
        """Write the config, start Prometheus and wait until /-/ready answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        argv = [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=1d", "--log.level=warn"]
        self.proc = spawn("prometheus", argv, self.workdir / "prometheus.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise PrometheusError(f"prometheus exited:\n{self.proc.log_tail()}")
            try:
                if self._http.get("/-/ready").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise PrometheusError(f"prometheus not ready after {timeout:.0f}s:\n{self.proc.log_tail()}")

    def stop(self) -> None:
        """Stop the process (by pid) and close the client."""
        if self.proc is not None:
            self.proc.stop(timeout=10.0)
        self._http.close()

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _get(self, path: str, **params: Any) -> Any:
        resp = self._http.get(f"/api/v1/{path}", params=params)
        body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
        if resp.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(f"GET /api/v1/{path} {params}: {resp.status_code} {body or resp.text[:500]}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result (vector or matrix)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        return self._get("query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        """A range query's series, each with `values` [[t, "v"], ...]."""
        return self._get("query_range", query=expr, start=start, end=end, step=step)["result"]

    def alerts(self) -> list[dict[str, Any]]:
        """Active (pending or firing) alerts."""
        return self._get("alerts")["alerts"]

    def active_targets(self, job: str | None = None) -> list[dict[str, Any]]:
        """Active scrape targets (optionally of one job), with `health` and `lastError`."""
        targets = self._get("targets", state="active")["activeTargets"]
        return [t for t in targets if job is None or t["labels"].get("job") == job]

    def rule_groups(self) -> list[dict[str, Any]]:
        """Loaded rule groups (proves the rule files were read)."""
        return self._get("rules")["groups"]
