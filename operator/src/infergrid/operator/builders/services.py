"""Services: the headless worker Service (discovery) and the client-facing Service (the endpoint)."""

from __future__ import annotations

from typing import Any

from infergrid.operator import constants as c
from infergrid.operator.builders.common import (
    child_metadata,
    client_service_name,
    selector_labels,
    worker_headless_name,
)
from infergrid.operator.spec import ServiceSpec

_WORKER_PORT = {"name": c.WORKER_PORT_NAME, "port": c.WORKER_PORT, "targetPort": c.WORKER_PORT_NAME,
                "protocol": "TCP"}


def build_worker_headless_service(spec: ServiceSpec) -> dict[str, Any]:
    """One DNS record per ready worker pod; the router and the autoscaler find workers through it."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(spec, worker_headless_name(spec)),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(spec),
            "ports": [dict(_WORKER_PORT)],
            "publishNotReadyAddresses": False,
        },
    }


def build_client_service(spec: ServiceSpec) -> dict[str, Any]:
    """The endpoint `http://NAME.NAMESPACE.svc:80`: the router pods behind one ClusterIP."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(spec, client_service_name(spec), c.COMPONENT_ROUTER),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(spec, c.COMPONENT_ROUTER),
            "ports": [{"name": "http", "port": c.SERVICE_PORT, "targetPort": c.ROUTER_PORT_NAME, "protocol": "TCP"}],
        },
    }
