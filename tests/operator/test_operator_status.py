"""Status computation from observed Deployment/pod summaries (pure functions)."""

import datetime

import pytest

from infergrid.operator.status import (
    DeploymentSummary,
    Observed,
    PodSummary,
    compute_status,
    transition_events,
)

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)
UNSCHEDULABLE = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."


def deploy(ready=0, replicas=2, updated=None, template_hash="h1", observed=1, deadline=False):
    return DeploymentSummary(generation=1, observed_generation=observed, spec_replicas=replicas,
                             replicas=replicas, ready_replicas=ready,
                             updated_replicas=replicas if updated is None else updated,
                             template_hash=template_hash, progress_deadline_exceeded=deadline)


def pod(name="p0", ready=False, unschedulable=None, broken=None, terminating=False):
    return PodSummary(name=name, is_ready=ready, is_terminating=terminating, unschedulable_message=unschedulable,
                      broken_reason=broken, broken_message=f"container worker: {broken}" if broken else None)


READY_ROUTER = DeploymentSummary(generation=1, observed_generation=1, spec_replicas=1, replicas=1, ready_replicas=1,
                                 updated_replicas=1, template_hash="r1", progress_deadline_exceeded=False)


def observed(deployment, pods=(), desired=2, generation=3, desired_hash="h1", router=READY_ROUTER):
    return Observed(generation=generation, desired_replicas=desired, desired_hash=desired_hash, gpus_per_pod=4,
                    gpu_resource_name="nvidia.com/gpu", selector="sel", endpoint="http://x.ns.svc:80",
                    deployment=deployment, pods=tuple(pods), router_replicas=1, router_hash="r1", router=router)


def conditions(status):
    return {c["type"]: c for c in status["conditions"]}


def test_all_workers_ready():
    status = compute_status(observed(deploy(ready=2)), None, T0)
    conds = conditions(status)
    assert conds["Ready"]["status"] == "True" and conds["Ready"]["reason"] == "Serving"
    assert conds["WorkersReady"]["status"] == "True"
    assert conds["Degraded"]["status"] == "False"
    assert status["readyReplicas"] == 2 and status["replicas"] == 2
    assert status["observedGeneration"] == 3
    assert status["selector"] == "sel" and status["endpoint"] == "http://x.ns.svc:80"
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])


def test_ready_needs_a_ready_router_too():
    status = compute_status(observed(deploy(ready=2), router=None), None, T0)
    conds = conditions(status)
    assert conds["RouterReady"]["status"] == "False" and conds["RouterReady"]["reason"] == "Pending"
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "RouterNotReady"
    not_ready = DeploymentSummary(generation=1, observed_generation=1, spec_replicas=1, replicas=1, ready_replicas=0,
                                  updated_replicas=1, template_hash="r1", progress_deadline_exceeded=False)
    conds = conditions(compute_status(observed(deploy(ready=2), router=not_ready), None, T0))
    assert conds["RouterReady"]["message"] == "0/1 router pods ready"
    assert conds["Ready"]["status"] == "False"


def test_router_rolling_out_still_serves():
    old_router = DeploymentSummary(generation=2, observed_generation=2, spec_replicas=1, replicas=2,
                                   ready_replicas=1, updated_replicas=0, template_hash="r0",
                                   progress_deadline_exceeded=False)
    conds = conditions(compute_status(observed(deploy(ready=2), router=old_router), None, T0))
    assert conds["RouterReady"]["status"] == "True" and conds["RouterReady"]["reason"] == "RollingOut"
    assert conds["Ready"]["status"] == "True"


def test_no_deployment_yet():
    status = compute_status(observed(None), None, T0)
    conds = conditions(status)
    assert conds["Ready"]["status"] == "False"
    assert conds["WorkersReady"]["reason"] == "Pending"
    assert status["observedGeneration"] == 0


def test_partially_ready_serves_but_workers_not_ready():
    conds = conditions(compute_status(observed(deploy(ready=1)), None, T0))
    assert conds["Ready"]["status"] == "True"
    assert conds["WorkersReady"]["status"] == "False"
    assert conds["WorkersReady"]["message"] == "1/2 workers ready"


def test_old_template_means_rolling_out_and_generation_not_observed():
    status = compute_status(observed(deploy(ready=2, template_hash="old")), {"observedGeneration": 2}, T0)
    assert conditions(status)["WorkersReady"]["reason"] == "RollingOut"
    assert status["observedGeneration"] == 2
    assert status["updatedReplicas"] == 0


def test_unschedulable_gpus_name_the_resource():
    pods = [pod("p0", unschedulable=UNSCHEDULABLE), pod("p1", unschedulable=UNSCHEDULABLE)]
    status = compute_status(observed(deploy(ready=0), pods), None, T0)
    conds = conditions(status)
    assert conds["Ready"]["status"] == "False"
    assert conds["Ready"]["reason"] == "InsufficientGPU"
    assert "nvidia.com/gpu" in conds["Ready"]["message"] and "need 4" in conds["Ready"]["message"]
    assert conds["Degraded"]["status"] == "True" and conds["Degraded"]["reason"] == "InsufficientGPU"
    assert conds["Degraded"]["message"].startswith("2 worker pod(s)")


def test_unschedulable_for_other_reasons():
    pods = [pod(unschedulable="0/2 nodes are available: 2 node(s) didn't match Pod's node affinity.")]
    assert conditions(compute_status(observed(deploy(), pods), None, T0))["Degraded"]["reason"] == "Unschedulable"


def test_terminating_pods_do_not_degrade():
    pods = [pod(unschedulable=UNSCHEDULABLE, terminating=True)]
    assert conditions(compute_status(observed(deploy(ready=2), pods), None, T0))["Degraded"]["status"] == "False"


def test_crash_loop_degrades_with_the_container_reason():
    conds = conditions(compute_status(observed(deploy(ready=1), [pod(broken="CrashLoopBackOff")]), None, T0))
    assert conds["Degraded"]["reason"] == "CrashLoopBackOff"
    assert conds["Ready"]["status"] == "True"  # one worker still serves


def test_progress_deadline_degrades():
    conds = conditions(compute_status(observed(deploy(ready=0, deadline=True)), None, T0))
    assert conds["Degraded"]["reason"] == "ProgressDeadlineExceeded"


def test_scaled_to_zero():
    conds = conditions(compute_status(observed(deploy(replicas=0), desired=0), None, T0))
    assert conds["Ready"] == {**conds["Ready"], "status": "False", "reason": "ScaledToZero"}
    assert conds["WorkersReady"]["status"] == "True"


def test_unchanged_status_is_equal_so_no_write_happens():
    first = compute_status(observed(deploy(ready=2)), None, T0)
    again = compute_status(observed(deploy(ready=2)), first, T1)
    assert again == first


def test_transition_time_moves_only_when_the_status_flips():
    first = compute_status(observed(deploy(ready=2)), None, T0)
    second = compute_status(observed(deploy(ready=0)), first, T1)
    assert conditions(second)["Ready"]["lastTransitionTime"] == "2026-01-01T00:05:00Z"
    assert conditions(second)["Degraded"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"


def test_status_keys_owned_by_others_are_kept():
    status = compute_status(observed(deploy(ready=2)), {"lastScaleTime": "x", "lastScaleReason": "queue"}, T0)
    assert status["lastScaleTime"] == "x" and status["lastScaleReason"] == "queue"


@pytest.mark.parametrize(("before", "after", "expected"), [
    (None, dict(ready=2), [("Normal", "Ready")]),
    (dict(ready=2), dict(ready=2), []),
    (dict(ready=2), dict(ready=0), [("Warning", "NotReady")]),
    (None, dict(ready=0, pods=[pod(unschedulable=UNSCHEDULABLE)]), [("Warning", "InsufficientGPU")]),
    (dict(ready=0, pods=[pod(unschedulable=UNSCHEDULABLE)]), dict(ready=0, pods=[pod(unschedulable=UNSCHEDULABLE)]), []),
    (dict(ready=0, pods=[pod(unschedulable=UNSCHEDULABLE)]), dict(ready=0, pods=[pod(broken="ErrImagePull")]),
     [("Warning", "ErrImagePull")]),
])
def test_events_on_transitions_only(before, after, expected):
    def status_of(kw):
        return compute_status(observed(deploy(ready=kw["ready"]), kw.get("pods", ())), None, T0)

    old = status_of(before) if before else None
    events = transition_events(old, status_of(after))
    assert [(e.type, e.reason) for e in events] == expected


def test_summaries_from_api_bodies():
    deployment = {
        "metadata": {"generation": 4},
        "spec": {"replicas": 3, "template": {"metadata": {"annotations": {"infergrid.dev/spec-hash": "abc"}}}},
        "status": {"observedGeneration": 4, "replicas": 3, "readyReplicas": 2, "updatedReplicas": 3,
                   "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]},
    }
    summary = DeploymentSummary.from_body(deployment)
    assert (summary.spec_replicas, summary.ready_replicas, summary.template_hash) == (3, 2, "abc")
    assert summary.progress_deadline_exceeded
    pending = {"metadata": {"name": "w-1"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": UNSCHEDULABLE}]}}
    assert PodSummary.from_body(pending).unschedulable_message == UNSCHEDULABLE
    crashing = {"metadata": {"name": "w-2", "deletionTimestamp": "t"}, "status": {
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [{"name": "worker", "state": {"waiting": {"reason": "CrashLoopBackOff",
                                                                       "message": "back-off"}}}]}}
    summary = PodSummary.from_body(crashing)
    assert summary.broken_reason == "CrashLoopBackOff" and summary.is_ready and summary.is_terminating
    assert summary.broken_message == "container worker: back-off"


def test_a_foreign_deployment_generation_bump_does_not_flap_workers_ready():
    settled = compute_status(observed(deploy(ready=2)), None, T0)
    bumped = DeploymentSummary(generation=2, observed_generation=1, spec_replicas=2, replicas=2, ready_replicas=2,
                               updated_replicas=2, template_hash="h1", progress_deadline_exceeded=False)
    assert compute_status(observed(bumped), settled, T1) == settled


def test_a_new_spec_not_yet_observed_by_the_deployment_controller_is_rolling_out():
    settled = compute_status(observed(deploy(ready=2)), None, T0)
    new_spec = DeploymentSummary(generation=2, observed_generation=1, spec_replicas=2, replicas=2, ready_replicas=2,
                                 updated_replicas=2, template_hash="h2", progress_deadline_exceeded=False)
    status = compute_status(observed(new_spec, desired_hash="h2", generation=4), settled, T1)
    assert conditions(status)["WorkersReady"]["reason"] == "RollingOut"
    assert status["updatedReplicas"] == 0 and status["observedGeneration"] == 4


def test_a_failing_reconcile_is_reported_as_degraded():
    failing = Observed(generation=2, desired_replicas=1, desired_hash="h2", gpus_per_pod=1,
                       gpu_resource_name="nvidia.com/gpu", selector="s", endpoint="e", deployment=None,
                       reconcile_error="applying the children failed: 422 Invalid: image: Required value")
    conds = conditions(compute_status(failing, None, T0))
    assert conds["Degraded"]["reason"] == "ReconcileFailed"
    assert conds["Ready"] == {**conds["Ready"], "status": "False", "reason": "ReconcileFailed"}
    assert "image: Required value" in conds["Ready"]["message"]


def test_autoscaled_services_get_a_scaling_condition_and_the_autoscalers_status_fields():
    base = observed(deploy(ready=2))
    auto = Observed(**{**base.__dict__, "is_autoscaled": True})
    assert "Scaling" not in conditions(compute_status(base, None, T0))
    first = compute_status(auto, None, T0)
    assert conditions(first)["Scaling"]["reason"] == "Initializing"
    scaled = Observed(**{**auto.__dict__, "scaling": {"status": "True", "reason": "ScaledUp", "message": "1 -> 2"},
                         "last_scale": ("2026-01-01T00:05:00Z", "queue"), "last_wake": "w1"})
    status = compute_status(scaled, first, T1)
    assert conditions(status)["Scaling"]["reason"] == "ScaledUp"
    assert (status["lastScaleTime"], status["lastScaleReason"], status["lastWake"]) == \
        ("2026-01-01T00:05:00Z", "queue", "w1")
    # after a restart the autoscaler has not decided yet: what the status says is kept
    assert compute_status(auto, status, T1) == status


def test_a_replaced_worker_degrades_until_cleared_and_scaling_to_zero_is_no_warning():
    base = observed(deploy(ready=2))
    replaced = Observed(**{**base.__dict__, "health": ("WorkerReplaced", "worker pod p1 is stalled")})
    degraded = conditions(compute_status(replaced, None, T0))["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "WorkerReplaced")
    serving = compute_status(observed(deploy(ready=1, replicas=1), desired=1), None, T0)
    zero = compute_status(observed(deploy(replicas=0), desired=0), serving, T1)
    assert transition_events(serving, zero) == []
