"""Names, labels, owner references and hashes shared by every child builder."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from infergrid.operator import constants as c
from infergrid.operator.spec import ServiceSpec


def worker_deployment_name(spec: ServiceSpec) -> str:
    return f"{spec.name}-worker"


def router_deployment_name(spec: ServiceSpec) -> str:
    return f"{spec.name}-router"


def worker_headless_name(spec: ServiceSpec) -> str:
    return f"{spec.name}-workers"


def client_service_name(spec: ServiceSpec) -> str:
    return spec.name


def endpoint_url(spec: ServiceSpec) -> str:
    return f"http://{client_service_name(spec)}.{spec.namespace}.svc:{c.SERVICE_PORT}"


def selector_labels(spec: ServiceSpec, component: str = c.COMPONENT_WORKER) -> dict[str, str]:
    """The immutable Deployment selector (never add keys here: selectors cannot change)."""
    return {c.LABEL_ISVC: spec.name, c.LABEL_COMPONENT: component}


def selector_string(spec: ServiceSpec) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(spec).items())


def common_labels(spec: ServiceSpec, component: str = c.COMPONENT_WORKER) -> dict[str, str]:
    return {
        c.LABEL_NAME: c.APP_NAME,
        c.LABEL_INSTANCE: spec.name,
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
        c.LABEL_PART_OF: c.APP_NAME,
        **selector_labels(spec, component),
    }


def owner_reference(spec: ServiceSpec) -> dict[str, Any]:
    """Controller reference to the InferenceService: deletion cascades through the garbage collector."""
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "name": spec.name,
        "uid": spec.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(spec: ServiceSpec, name: str, component: str = c.COMPONENT_WORKER) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": spec.namespace,
        "labels": common_labels(spec, component),
        "ownerReferences": [owner_reference(spec)],
    }


def stable_hash(obj: Any) -> str:
    """Short content hash of a JSON-able object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
