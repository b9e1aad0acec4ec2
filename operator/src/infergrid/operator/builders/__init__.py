"""Pure builders: InferenceService spec -> the child objects as plain dicts (no API calls here)."""

from __future__ import annotations

from typing import Any

from infergrid.operator.builders.common import endpoint_url, selector_string, stable_hash
from infergrid.operator.builders.monitoring import build_pod_monitor, build_router_pod_monitor
from infergrid.operator.builders.policies import (
    build_network_policy,
    build_pod_disruption_budget,
    build_router_network_policy,
)
from infergrid.operator.builders.router import (
    build_router_deployment,
    build_router_pod_template,
    build_router_role,
    build_router_role_binding,
    build_router_service_account,
)
from infergrid.operator.builders.services import build_client_service, build_worker_headless_service
from infergrid.operator.builders.worker import build_worker_deployment, build_worker_pod_template
from infergrid.operator.config import OperatorConfig
from infergrid.operator.spec import ServiceSpec

__all__ = [
    "build_children", "build_client_service", "build_network_policy", "build_pod_disruption_budget",
    "build_pod_monitor", "build_router_deployment", "build_router_network_policy", "build_router_pod_monitor",
    "build_router_pod_template", "build_worker_deployment", "build_worker_headless_service",
    "build_worker_pod_template", "endpoint_url", "selector_string", "stable_hash",
]


def build_children(spec: ServiceSpec, config: OperatorConfig, *, current_replicas: int | None = None,
                   has_pod_monitor: bool = False) -> list[dict[str, Any]]:
    """Every child of one InferenceService, in apply order (the workers' Service before the workers)."""
    children = [
        build_worker_headless_service(spec),
        build_client_service(spec),
        build_pod_disruption_budget(spec),
        build_network_policy(spec, config),
        build_router_network_policy(spec),
        build_router_service_account(spec),
        build_router_role(spec),
        build_router_role_binding(spec),
        build_router_deployment(spec, config),
        build_worker_deployment(spec, config, current_replicas),
    ]
    if has_pod_monitor:
        children += [build_pod_monitor(spec), build_router_pod_monitor(spec)]
    return children
