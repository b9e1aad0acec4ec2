"""In-memory view of InferenceServices, their worker and router Deployments and worker pods, fed by watch events."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from infergrid.operator import constants as c
from infergrid.operator.spec import ServiceSpec
from infergrid.operator.status import DeploymentSummary, PodSummary

Key = tuple[str, str]  # (namespace, InferenceService name)

# Large metadata the operator never reads (kept out of memory: 1,000 services hold ~1,000 copies),
# except the annotations it does read.
_DROPPED_META = frozenset({"managedFields", "annotations"})
KEPT_ANNOTATIONS = frozenset({c.ANNOTATION_WAKE})


def owner_key(body: Mapping[str, Any]) -> Key | None:
    """The InferenceService a worker Deployment or pod belongs to, from its labels."""
    meta = body.get("metadata", {})
    name = (meta.get("labels") or {}).get(c.LABEL_ISVC)
    return (meta.get("namespace", ""), name) if name else None


class ServiceCache:
    """Latest seen InferenceService bodies and worker summaries, keyed by (namespace, name)."""

    def __init__(self) -> None:
        self.services: dict[Key, dict[str, Any]] = {}
        self.deployments: dict[Key, DeploymentSummary] = {}  # the worker Deployments
        self.routers: dict[Key, DeploymentSummary] = {}  # the router Deployments
        self.pods: dict[Key, dict[str, PodSummary]] = {}
        self.router_ips: dict[Key, dict[str, str]] = {}  # router pod name -> pod IP (running ones)

    def update_service(self, event_type: str | None, body: Mapping[str, Any]) -> Key:
        meta = body["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        if event_type == "DELETED":
            self.services.pop(key, None)
        else:
            kept = {k: v for k, v in body.items() if k != "metadata"}
            kept["metadata"] = {k: v for k, v in meta.items() if k not in _DROPPED_META}
            annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k in KEPT_ANNOTATIONS}
            if annotations:
                kept["metadata"]["annotations"] = annotations
            self.services[key] = copy.deepcopy(kept)
        return key

    def update_deployment(self, event_type: str | None, body: Mapping[str, Any]) -> Key | None:
        key = owner_key(body)
        if key is None:
            return None
        component = (body["metadata"].get("labels") or {}).get(c.LABEL_COMPONENT)
        store = self.routers if component == c.COMPONENT_ROUTER else self.deployments
        if event_type == "DELETED":
            store.pop(key, None)
        else:
            store[key] = DeploymentSummary.from_body(body)
        return key

    def update_pod(self, event_type: str | None, body: Mapping[str, Any]) -> Key | None:
        key = owner_key(body)
        if key is None:
            return None
        name = body["metadata"]["name"]
        if event_type == "DELETED":
            pods = self.pods.get(key, {})
            pods.pop(name, None)
            if not pods:
                self.pods.pop(key, None)
        else:
            self.pods.setdefault(key, {})[name] = PodSummary.from_body(body)
        return key

    def update_router_pod(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = owner_key(body)
        if key is None:
            return
        meta, status = body["metadata"], body.get("status") or {}
        routers = self.router_ips.setdefault(key, {})
        if event_type == "DELETED" or meta.get("deletionTimestamp") or not status.get("podIP"):
            routers.pop(meta["name"], None)
        else:
            routers[meta["name"]] = status["podIP"]
        if not routers:
            self.router_ips.pop(key, None)

    def live_spec(self, key: Key) -> ServiceSpec | None:
        """The parsed spec of a service that exists and is not being deleted (None otherwise, or when its
        spec does not parse: the reconcile reports that)."""
        body = self.services.get(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        try:
            return ServiceSpec.from_body(body)
        except (KeyError, ValueError):
            return None

    def current_replicas(self, key: Key) -> int | None:
        deploy = self.deployments.get(key)
        return deploy.spec_replicas if deploy else None
