"""The router: a Deployment of `infergrid-router` pods (the endpoint's backends) and its API access.

The router discovers workers by watching the EndpointSlices of the headless worker Service, so each
service gets a ServiceAccount whose Role may read exactly that (get/list/watch endpointslices in its
own namespace). API keys come from the Secret in `spec.router.apiKeySecretRef`, mounted as a volume
(the kubelet refreshes it, so keys rotate without a restart); the operator never reads the Secret.
"""

from __future__ import annotations

from typing import Any

from infergrid.operator import constants as c
from infergrid.operator.builders.common import (
    child_metadata,
    common_labels,
    router_deployment_name,
    selector_labels,
    stable_hash,
    worker_headless_name,
)
from infergrid.operator.builders.worker import container_security_context, pod_security_context
from infergrid.operator.config import OperatorConfig
from infergrid.operator.spec import ServiceSpec

# preStop sleep + the router's drain of in-flight (possibly streaming) requests after SIGTERM.
ROUTER_GRACE_SECONDS = 60


def build_router_service_account(spec: ServiceSpec) -> dict[str, Any]:
    """The identity the router pods use to watch the worker EndpointSlices."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": child_metadata(spec, router_deployment_name(spec), c.COMPONENT_ROUTER),
    }


def build_router_role(spec: ServiceSpec) -> dict[str, Any]:
    """Read-only access to the EndpointSlices of this namespace (the router filters by Service label)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": child_metadata(spec, router_deployment_name(spec), c.COMPONENT_ROUTER),
        "rules": [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                   "verbs": ["get", "list", "watch"]}],
    }


def build_router_role_binding(spec: ServiceSpec) -> dict[str, Any]:
    name = router_deployment_name(spec)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": child_metadata(spec, name, c.COMPONENT_ROUTER),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": spec.namespace}],
    }


def build_router_pod_template(spec: ServiceSpec, config: OperatorConfig) -> dict[str, Any]:
    """The router pod template, with the spec-hash annotation that drives its rollouts."""
    args = [
        "--namespace", spec.namespace,
        "--service", spec.name,
        "--workers-service", worker_headless_name(spec),
        "--host", "$(POD_IP)",
        "--port", str(c.ROUTER_PORT),
        "--policy", spec.router.policy,
    ]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    keys = spec.router.api_key_secret
    if keys is not None:
        args += ["--api-key-file", f"{c.API_KEYS_MOUNT_PATH}/{keys.key}"]
        volumes.append({"name": "api-keys", "secret": {"secretName": keys.name, "items": [
            {"key": keys.key, "path": keys.key}]}})
        mounts.append({"name": "api-keys", "mountPath": c.API_KEYS_MOUNT_PATH, "readOnly": True})
    container: dict[str, Any] = {
        "name": "router",
        "image": config.router_image,
        "command": ["infergrid-router"],
        "args": args,
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": c.ROUTER_PORT_NAME, "containerPort": c.ROUTER_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "readinessProbe": _probe("/ready", period=2, failures=2),
        "livenessProbe": _probe("/health", period=10, failures=3),
        # NOTE: the endpoint's Service drops a terminating pod only after kube-proxy sees it; keep serving meanwhile.
        "lifecycle": {"preStop": {"sleep": {"seconds": c.PRESTOP_SLEEP_SECONDS}}},
        "securityContext": container_security_context(config),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if config.router_image_pull_policy:
        container["imagePullPolicy"] = config.router_image_pull_policy
    pod_spec: dict[str, Any] = {
        "serviceAccountName": router_deployment_name(spec),
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(config),
        "terminationGracePeriodSeconds": ROUTER_GRACE_SECONDS,
        "containers": [container],
        "volumes": volumes,
    }
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    template: dict[str, Any] = {
        "metadata": {"labels": common_labels(spec, c.COMPONENT_ROUTER), "annotations": {}},
        "spec": pod_spec,
    }
    template["metadata"]["annotations"][c.ANNOTATION_SPEC_HASH] = stable_hash(template)
    return template


def build_router_deployment(spec: ServiceSpec, config: OperatorConfig) -> dict[str, Any]:
    """`spec.router.replicas` router pods; they roll (surge first) whenever their template changes."""
    template = build_router_pod_template(spec, config)
    metadata = child_metadata(spec, router_deployment_name(spec), c.COMPONENT_ROUTER)
    metadata["annotations"] = {c.ANNOTATION_SPEC_HASH: template["metadata"]["annotations"][c.ANNOTATION_SPEC_HASH]}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": selector_labels(spec, c.COMPONENT_ROUTER)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": template,
        },
    }


def _probe(path: str, *, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": c.ROUTER_PORT_NAME}, "periodSeconds": period,
            "timeoutSeconds": 2, "failureThreshold": failures}
