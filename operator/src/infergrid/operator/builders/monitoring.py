"""Prometheus Operator PodMonitor for the workers (built only when the CRD is installed)."""

from __future__ import annotations

from typing import Any

from infergrid.operator import constants as c
from infergrid.operator.builders.common import child_metadata, selector_labels, worker_deployment_name
from infergrid.operator.spec import ServiceSpec

MONITORING_GROUP_VERSION = "monitoring.coreos.com/v1"
# NOTE: the dashboards and alert rules group by `service` (the InferenceService); the Prometheus
# Operator adds namespace, pod and container itself. testbed/prometheus.py mirrors this selector.
SERVICE_RELABELING = {"sourceLabels": ["__meta_kubernetes_pod_label_infergrid_dev_inferenceservice"],
                      "targetLabel": "service"}


def build_pod_monitor(spec: ServiceSpec) -> dict[str, Any]:
    """Scrape every worker's `/metrics` (vLLM metric names) every 15 s."""
    return {
        "apiVersion": MONITORING_GROUP_VERSION,
        "kind": "PodMonitor",
        "metadata": child_metadata(spec, worker_deployment_name(spec)),
        "spec": {
            "selector": {"matchLabels": selector_labels(spec)},
            "podMetricsEndpoints": [{"port": c.WORKER_PORT_NAME, "path": "/metrics", "interval": "15s",
                                     "relabelings": [SERVICE_RELABELING]}],
        },
    }


def build_router_pod_monitor(spec: ServiceSpec) -> dict[str, Any]:
    """Scrape the service's router pods' `/metrics` (port `http`, 8080) every 15 s."""
    return {
        "apiVersion": MONITORING_GROUP_VERSION,
        "kind": "PodMonitor",
        "metadata": child_metadata(spec, f"{spec.name}-router", c.COMPONENT_ROUTER),
        "spec": {
            "selector": {"matchLabels": selector_labels(spec, c.COMPONENT_ROUTER)},
            "podMetricsEndpoints": [{"port": c.ROUTER_PORT_NAME, "path": "/metrics", "interval": "15s",
                                     "relabelings": [SERVICE_RELABELING]}],
        },
    }
