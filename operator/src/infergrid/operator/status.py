"""InferenceService status from what the cluster reports: pure functions, no API calls.

Inputs are small summaries of the worker Deployment and its pods (kept in kopf indices); the output is
the whole `status` object. The caller writes it only when it differs from the stored one.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from infergrid.operator import constants as c
from infergrid.operator.pod_failure import CONFIG_ERROR, container_failure

READY, WORKERS_READY, ROUTER_READY, DEGRADED, SCALING = "Ready", "WorkersReady", "RouterReady", "Degraded", "Scaling"
CONDITION_TYPES = (READY, WORKERS_READY, ROUTER_READY, DEGRADED, SCALING)
_BROKEN_WAITING = frozenset({"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError",
                             "CreateContainerError", "InvalidImageName", "RunContainerError"})


@dataclasses.dataclass(frozen=True)
class DeploymentSummary:
    """What status needs from the worker Deployment."""

    generation: int
    observed_generation: int
    spec_replicas: int
    replicas: int
    ready_replicas: int
    updated_replicas: int
    template_hash: str | None
    progress_deadline_exceeded: bool

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> DeploymentSummary:
        meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status", {}) or {}
        template_meta = (spec.get("template") or {}).get("metadata") or {}
        conditions = status.get("conditions") or []
        return cls(
            generation=int(meta.get("generation", 0)),
            observed_generation=int(status.get("observedGeneration", 0)),
            spec_replicas=int(spec.get("replicas", 1)),
            replicas=int(status.get("replicas", 0)),
            ready_replicas=int(status.get("readyReplicas", 0)),
            updated_replicas=int(status.get("updatedReplicas", 0)),
            template_hash=(template_meta.get("annotations") or {}).get(c.ANNOTATION_SPEC_HASH),
            progress_deadline_exceeded=any(
                cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded"
                for cond in conditions),
        )


@dataclasses.dataclass(frozen=True)
class PodSummary:
    """What status needs from one worker pod."""

    name: str
    is_ready: bool
    is_terminating: bool
    unschedulable_message: str | None
    broken_reason: str | None
    broken_message: str | None
    # For the health monitor and the autoscaler's scrapes:
    ip: str | None = None
    is_started: bool = False  # the worker container passed its startup probe
    restart_count: int = 0
    ready_changed_at: str | None = None  # the Ready condition's lastTransitionTime
    is_down: bool = False  # the worker container is not running (waiting to restart, or exited)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PodSummary:
        meta, status = body.get("metadata", {}), body.get("status", {}) or {}
        conditions = {cond.get("type"): cond for cond in status.get("conditions") or []}
        scheduled = conditions.get("PodScheduled", {})
        unschedulable = None
        if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            unschedulable = scheduled.get("message") or "no node fits the pod"
        broken_reason = broken_message = None
        for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            waiting = (container.get("state") or {}).get("waiting") or {}
            failure = container_failure(container)
            if failure is not None:
                broken_reason, broken_message = failure.reason, failure.message
                break
            if waiting.get("reason") in _BROKEN_WAITING:
                broken_reason = waiting["reason"]
                broken_message = f"container {container.get('name')}: {waiting.get('message') or broken_reason}"
                break
        workers = [cs for cs in status.get("containerStatuses") or [] if cs.get("name") == "worker"]
        worker = workers[0] if workers else {}
        return cls(
            name=meta.get("name", ""),
            is_ready=conditions.get("Ready", {}).get("status") == "True",
            is_terminating=bool(meta.get("deletionTimestamp")),
            unschedulable_message=unschedulable,
            broken_reason=broken_reason,
            broken_message=broken_message,
            ip=status.get("podIP") or None,
            is_started=bool(worker.get("started")),
            restart_count=int(worker.get("restartCount", 0)),
            ready_changed_at=conditions.get("Ready", {}).get("lastTransitionTime"),
            is_down=bool(worker) and "running" not in (worker.get("state") or {}),
        )


@dataclasses.dataclass(frozen=True)
class Observed:
    """Everything observed about one InferenceService's workers, plus what the spec asks for."""

    generation: int
    desired_replicas: int
    desired_hash: str
    gpus_per_pod: int
    gpu_resource_name: str
    selector: str
    endpoint: str
    deployment: DeploymentSummary | None
    pods: tuple[PodSummary, ...] = ()
    reconcile_error: str | None = None
    router_replicas: int = 1
    router_hash: str | None = None
    router: DeploymentSummary | None = None
    # From the autoscaler and the health monitor (None: keep what the status says).
    is_autoscaled: bool = False
    scaling: Mapping[str, str] | None = None  # the Scaling condition's status, reason, message
    last_scale: tuple[str, str] | None = None  # (lastScaleTime, lastScaleReason)
    last_wake: str | None = None  # the infergrid.dev/wake annotation value last acted on
    health: tuple[str, str] | None = None  # (reason, message) of the last worker pod replaced


def _condition(kind: str, is_true: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": "True" if is_true else "False", "reason": reason, "message": message}


def compute_status(observed: Observed, old_status: Mapping[str, Any] | None,
                   now: datetime.datetime | None = None) -> dict[str, Any]:
    """The full new status; unchanged conditions keep their lastTransitionTime, so equal means no write."""
    old_status = old_status or {}
    deploy = observed.deployment
    desired = observed.desired_replicas
    # NOTE: the spec is "observed" once the worker Deployment carries it; its pods may still be rolling.
    is_applied = deploy is not None and deploy.template_hash == observed.desired_hash \
        and deploy.spec_replicas == desired
    is_current = is_applied and deploy is not None and deploy.observed_generation >= deploy.generation
    ready = deploy.ready_replicas if deploy else 0
    updated = deploy.updated_replicas if (deploy and is_current) else 0
    workers = _workers_condition(observed, deploy, is_current, ready, updated)
    # A Deployment generation bump that is not ours (an annotation, say) leaves its counts stale for a
    # moment: keep what was reported for the same spec instead of flapping to RollingOut and back.
    old_workers = next((cond for cond in old_status.get("conditions") or [] if cond.get("type") == WORKERS_READY),
                       None)
    if is_applied and not is_current and old_status.get("specHash") == observed.desired_hash and old_workers:
        updated = int(old_status.get("updatedReplicas", 0))
        workers = {k: old_workers[k] for k in ("type", "status", "reason", "message") if k in old_workers}
    degraded = _degraded_condition(observed, deploy)
    router = _router_condition(observed)
    if desired == 0:
        overall = _condition(READY, False, "ScaledToZero", "no worker replicas are running")
    elif ready > 0 and router["status"] != "True":
        overall = _condition(READY, False, "RouterNotReady", router["message"])
    elif ready > 0:
        overall = _condition(READY, True, "Serving", f"{ready}/{desired} workers ready at {observed.endpoint}")
    elif degraded["status"] == "True":
        overall = _condition(READY, False, degraded["reason"], degraded["message"])
    else:
        overall = _condition(READY, False, workers["reason"], workers["message"])

    stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    old_conditions = {cond.get("type"): cond for cond in old_status.get("conditions") or []}
    conditions = []
    extra = [_scaling_condition(observed, old_conditions.get(SCALING))] if observed.is_autoscaled else []
    for cond in (overall, workers, router, degraded, *extra):
        previous = old_conditions.get(cond["type"])
        is_same = previous is not None and previous.get("status") == cond["status"]
        cond["lastTransitionTime"] = previous.get("lastTransitionTime", stamp) if is_same else stamp
        cond["observedGeneration"] = observed.generation
        conditions.append(cond)

    status = {key: value for key, value in old_status.items() if key not in OWNED_KEYS}
    status.update({
        "observedGeneration": observed.generation if is_applied else old_status.get("observedGeneration", 0),
        "replicas": desired,
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "selector": observed.selector,
        "endpoint": observed.endpoint,
        "specHash": observed.desired_hash,
        "conditions": conditions,
    })
    last_scale = observed.last_scale or (old_status.get("lastScaleTime"), old_status.get("lastScaleReason"))
    last_wake = observed.last_wake or old_status.get("lastWake")
    for key, value in (("lastScaleTime", last_scale[0]), ("lastScaleReason", last_scale[1]), ("lastWake", last_wake)):
        if value is not None:
            status[key] = value
    return status


OWNED_KEYS = frozenset({"observedGeneration", "replicas", "readyReplicas", "updatedReplicas", "selector",
                         "endpoint", "specHash", "conditions", "lastScaleTime", "lastScaleReason", "lastWake"})


def _scaling_condition(observed: Observed, old: Mapping[str, Any] | None) -> dict[str, Any]:
    if observed.scaling is not None:
        return {"type": SCALING, **observed.scaling}
    if old is not None:  # e.g. after a restart, until the autoscaler's first decision
        return {k: old[k] for k in ("type", "status", "reason", "message") if k in old}
    return _condition(SCALING, True, "Initializing", "the autoscaler has not decided yet")


def _workers_condition(observed: Observed, deploy: DeploymentSummary | None, is_current: bool,
                       ready: int, updated: int) -> dict[str, Any]:
    desired = observed.desired_replicas
    if desired == 0:
        return _condition(WORKERS_READY, True, "ScaledToZero", "0 workers requested")
    if deploy is None:
        return _condition(WORKERS_READY, False, "Pending", "the worker Deployment does not exist yet")
    if not is_current or updated < desired:
        return _condition(WORKERS_READY, False, "RollingOut", f"{updated}/{desired} workers run the current spec")
    if ready < desired:
        return _condition(WORKERS_READY, False, "WorkersNotReady", f"{ready}/{desired} workers ready")
    return _condition(WORKERS_READY, True, "AllWorkersReady", f"{ready}/{desired} workers ready")


def _router_condition(observed: Observed) -> dict[str, Any]:
    """RouterReady: at least one router pod running the current router template is ready."""
    router = observed.router
    if router is None:
        return _condition(ROUTER_READY, False, "Pending", "the router Deployment does not exist yet")
    is_current = router.template_hash == observed.router_hash and router.observed_generation >= router.generation
    want = observed.router_replicas
    if router.ready_replicas == 0:
        return _condition(ROUTER_READY, False, "RouterNotReady", f"0/{want} router pods ready")
    if not is_current or router.updated_replicas < want:
        return _condition(ROUTER_READY, True, "RollingOut",
                          f"{router.ready_replicas}/{want} router pods ready, {router.updated_replicas} updated")
    return _condition(ROUTER_READY, True, "RouterReady", f"{router.ready_replicas}/{want} router pods ready")


def _degraded_condition(observed: Observed, deploy: DeploymentSummary | None) -> dict[str, Any]:
    if observed.reconcile_error:
        return _condition(DEGRADED, True, "ReconcileFailed", observed.reconcile_error)
    live = [pod for pod in observed.pods if not pod.is_terminating]
    unschedulable = sorted((p for p in live if p.unschedulable_message), key=lambda p: p.name)
    if unschedulable:
        message = unschedulable[0].unschedulable_message or ""
        is_gpu = f"Insufficient {observed.gpu_resource_name}" in message
        reason = "InsufficientGPU" if is_gpu else "Unschedulable"
        prefix = (f"{len(unschedulable)} worker pod(s) need {observed.gpus_per_pod} {observed.gpu_resource_name} "
                  f"each and cannot be scheduled")
        return _condition(DEGRADED, True, reason, f"{prefix}: {message}")
    # A refused configuration is the actionable failure: name it before other pods' crashes.
    broken = sorted((p for p in live if p.broken_reason), key=lambda p: (p.broken_reason != CONFIG_ERROR, p.name))
    if broken:
        pod = broken[0]
        return _condition(DEGRADED, True, pod.broken_reason or "WorkerFailing",
                          f"{len(broken)} worker pod(s) failing; {pod.name}: {pod.broken_message}")
    if observed.health is not None:
        return _condition(DEGRADED, True, *observed.health)
    if deploy is not None and deploy.progress_deadline_exceeded:
        return _condition(DEGRADED, True, "ProgressDeadlineExceeded", "the worker rollout made no progress in time")
    return _condition(DEGRADED, False, "AsExpected", "no failing or unschedulable workers")


@dataclasses.dataclass(frozen=True)
class StatusEvent:
    """A Kubernetes Event to post for a condition transition."""

    type: str
    reason: str
    message: str


def transition_events(old_status: Mapping[str, Any] | None, new_status: Mapping[str, Any]) -> list[StatusEvent]:
    """Events worth a human's attention: Ready flips, and Degraded turning on or changing reason."""
    old = {cond.get("type"): cond for cond in (old_status or {}).get("conditions") or []}
    new = {cond.get("type"): cond for cond in new_status.get("conditions") or []}
    events: list[StatusEvent] = []
    degraded, was_degraded = new.get(DEGRADED, {}), old.get(DEGRADED, {})
    if degraded.get("status") == "True" and (was_degraded.get("status") != "True"
                                            or was_degraded.get("reason") != degraded.get("reason")):
        events.append(StatusEvent("Warning", degraded["reason"], degraded["message"]))
    ready, was_ready = new.get(READY, {}), old.get(READY, {})
    if ready.get("status") == "True" and was_ready.get("status") != "True":
        events.append(StatusEvent("Normal", "Ready", ready["message"]))
    elif ready.get("status") == "False" and was_ready.get("status") == "True" and ready.get("reason") != "ScaledToZero":
        # (scaling to zero is no warning: the autoscaler posts its own Event for it)
        events.append(StatusEvent("Warning", "NotReady", f"{ready['reason']}: {ready['message']}"))
    return events


def summarize_pods(bodies: Iterable[Mapping[str, Any]]) -> tuple[PodSummary, ...]:
    return tuple(PodSummary.from_body(body) for body in bodies)
