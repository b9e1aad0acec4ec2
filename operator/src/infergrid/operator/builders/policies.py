"""PodDisruptionBudget and NetworkPolicy for the worker pods."""

from __future__ import annotations

from typing import Any

from infergrid.operator import constants as c
from infergrid.operator.builders.common import (
    child_metadata,
    router_deployment_name,
    selector_labels,
    worker_deployment_name,
)
from infergrid.operator.config import OperatorConfig
from infergrid.operator.spec import ServiceSpec


def build_pod_disruption_budget(spec: ServiceSpec) -> dict[str, Any]:
    """Voluntary evictions (node drains) take at most one worker at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": child_metadata(spec, worker_deployment_name(spec)),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(spec)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def build_network_policy(spec: ServiceSpec, config: OperatorConfig) -> dict[str, Any]:
    """Workers accept traffic on their port only from this service's router pods, Prometheus and the
    operator (whose autoscaler and health monitor read their metrics)."""
    router = {"podSelector": {"matchLabels": selector_labels(spec, c.COMPONENT_ROUTER)}}
    prometheus = {"podSelector": {"matchLabels": dict(config.prometheus_pod_labels)},
                  "namespaceSelector": {"matchLabels": dict(config.prometheus_namespace_labels)}}
    sources = [router, prometheus]
    if config.operator_pod_labels and config.operator_namespace:
        sources.append({"podSelector": {"matchLabels": dict(config.operator_pod_labels)},
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": config.operator_namespace}}})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": child_metadata(spec, worker_deployment_name(spec)),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(spec)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": sources, "ports": [{"protocol": "TCP", "port": c.WORKER_PORT}]}],
        },
    }


def build_router_network_policy(spec: ServiceSpec) -> dict[str, Any]:
    """The router is the endpoint: any client (other namespaces, an ingress controller, a gateway) may reach it.

    NOTE: written out so that a namespace whose default policy denies ingress still admits the endpoint.
    """
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": child_metadata(spec, router_deployment_name(spec), c.COMPONENT_ROUTER),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(spec, c.COMPONENT_ROUTER)},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"protocol": "TCP", "port": c.ROUTER_PORT}]}],
        },
    }
