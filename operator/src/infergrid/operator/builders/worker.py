"""The worker Deployment: one pod per replica, `tensorParallelSize` GPUs each."""

from __future__ import annotations

import math
from typing import Any

from infergrid.operator import constants as c
from infergrid.operator.builders.common import (
    child_metadata,
    common_labels,
    selector_labels,
    stable_hash,
    worker_deployment_name,
)
from infergrid.operator.builders.overrides import merge_overrides
from infergrid.operator.config import OperatorConfig
from infergrid.operator.engine_args import build_engine_args
from infergrid.operator.sources import (
    GGUF_CACHE_PATH,
    MODEL_CACHE_PATH,
    MODEL_CACHE_VOLUME,
    ModelMount,
    plan_model_mount,
)
from infergrid.operator.spec import ServiceSpec, desired_replicas

STARTUP_PERIOD_SECONDS = 10


def container_security_context(config: OperatorConfig) -> dict[str, Any]:
    """Pod Security Standards "restricted" for one container."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": config.run_as_user,
        "runAsGroup": config.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context(config: OperatorConfig) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": config.run_as_user,
        "runAsGroup": config.run_as_user,
        "fsGroup": config.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def termination_grace_seconds(spec: ServiceSpec) -> int:
    """preStop sleep + the worker's drain timeout + a margin for process exit."""
    return c.PRESTOP_SLEEP_SECONDS + spec.drain_seconds + 15


def build_worker_pod_template(spec: ServiceSpec, config: OperatorConfig) -> dict[str, Any]:
    """The worker pod template, with the spec-hash annotation that drives rollouts."""
    image = spec.image or config.worker_image
    pull_policy = spec.image_pull_policy or config.worker_image_pull_policy
    security = container_security_context(config)
    token_env = _token_env(spec)
    mounts = [plan_model_mount(spec.source, "model", image=image, image_pull_policy=pull_policy,
                               security_context=security, token_env=token_env)]
    draft_source = spec.engine.speculative.draft_source
    if spec.engine.speculative.method == "draft" and draft_source is not None:
        mounts.append(plan_model_mount(draft_source, "draft", image=image, image_pull_policy=pull_policy,
                                       security_context=security, token_env=token_env))
    uses_cache = any(m.init_containers for m in mounts)

    container: dict[str, Any] = {
        "name": "worker",
        "image": image,
        "command": ["infergrid-worker", "serve"],
        "args": [
            "--model", mounts[0].path,
            "--host", "$(POD_IP)",
            "--port", str(c.WORKER_PORT),
            "--served-model-name", spec.served_name,
            "--drain-timeout", str(spec.drain_seconds),
            "--model-cache-dir", GGUF_CACHE_PATH,  # a .gguf source is converted here (read-only root)
            *build_engine_args(spec.engine, mounts[1].path if len(mounts) > 1 else None),
        ],
        "env": _worker_env(uses_cache),
        "ports": [{"name": c.WORKER_PORT_NAME, "containerPort": c.WORKER_PORT, "protocol": "TCP"}],
        "resources": _resources(spec),
        "startupProbe": _probe("/ready", period=STARTUP_PERIOD_SECONDS, timeout=5,
                               failures=max(3, math.ceil(spec.startup_seconds / STARTUP_PERIOD_SECONDS))),
        "readinessProbe": _probe("/ready", period=5, timeout=3, failures=3),
        "livenessProbe": _probe("/health", period=10, timeout=5, failures=6),
        "lifecycle": {"preStop": {"sleep": {"seconds": c.PRESTOP_SLEEP_SECONDS}}},
        "securityContext": security,
        "volumeMounts": _volume_mounts(mounts, uses_cache),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if pull_policy:
        container["imagePullPolicy"] = pull_policy

    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(config),
        "terminationGracePeriodSeconds": termination_grace_seconds(spec),
        "containers": [container],
        "volumes": _volumes(spec, mounts, uses_cache),
        "tolerations": [
            {"key": spec.resources.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"},
            *[dict(t) for t in spec.tolerations],
        ],
    }
    init_containers = [init for m in mounts for init in m.init_containers]
    if init_containers:
        pod_spec["initContainers"] = init_containers
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.affinity:
        pod_spec["affinity"] = dict(spec.affinity)
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]

    template: dict[str, Any] = {
        "metadata": {"labels": common_labels(spec), "annotations": {}},
        "spec": pod_spec,
    }
    if spec.pod_template:
        template = merge_overrides(template, dict(spec.pod_template))
        template["metadata"]["labels"].update(selector_labels(spec))
    template["metadata"]["annotations"][c.ANNOTATION_SPEC_HASH] = stable_hash(template)
    return template


def build_worker_deployment(spec: ServiceSpec, config: OperatorConfig,
                            current_replicas: int | None = None) -> dict[str, Any]:
    """The worker Deployment; `current_replicas` matters only in autoscaled mode (kept within bounds)."""
    template = build_worker_pod_template(spec, config)
    metadata = child_metadata(spec, worker_deployment_name(spec))
    metadata["annotations"] = {c.ANNOTATION_SPEC_HASH: template["metadata"]["annotations"][c.ANNOTATION_SPEC_HASH]}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": desired_replicas(spec, current_replicas),
            "selector": {"matchLabels": selector_labels(spec)},
            # NOTE: surge rather than take a serving worker down; a rollout without a spare GPU waits.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": spec.startup_seconds + 300,
            "revisionHistoryLimit": 3,
            "template": template,
        },
    }


def _token_env(spec: ServiceSpec) -> list[dict[str, Any]]:
    if spec.token_secret is None:
        return []
    ref = {"name": spec.token_secret.name, "key": spec.token_secret.key}
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}}]


def _worker_env(uses_cache: bool) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    if uses_cache:
        env += [{"name": "HF_HOME", "value": f"{MODEL_CACHE_PATH}/.hf"}, {"name": "HF_HUB_OFFLINE", "value": "1"}]
    return env


def _resources(spec: ServiceSpec) -> dict[str, Any]:
    gpus = str(spec.engine.tensor_parallel_size)
    requests: dict[str, str] = {spec.resources.gpu_resource_name: gpus}
    limits: dict[str, str] = {spec.resources.gpu_resource_name: gpus}
    if spec.resources.cpu is not None:
        requests["cpu"] = spec.resources.cpu
    if spec.resources.memory is not None:
        requests["memory"] = limits["memory"] = spec.resources.memory
    return {"requests": requests, "limits": limits}


def _probe(path: str, *, period: int, timeout: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": c.WORKER_PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _volumes(spec: ServiceSpec, mounts: list[ModelMount], uses_cache: bool) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm_size}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if uses_cache:
        volumes.append({"name": MODEL_CACHE_VOLUME, "emptyDir": {}})
    for mount in mounts:
        volumes += [dict(v) for v in mount.volumes]
    return volumes


def _volume_mounts(mounts: list[ModelMount], uses_cache: bool) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if uses_cache:
        result.append({"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_PATH, "readOnly": True})
    for mount in mounts:
        result += [dict(m) for m in mount.mounts]
    return result
