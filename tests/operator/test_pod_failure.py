"""Worker container failures read from pod status dicts, and how they reach the InferenceService status."""

import dataclasses
import datetime

import pytest

from infergrid.operator.pod_failure import container_failure, one_line
from infergrid.operator.status import (
    DeploymentSummary,
    Observed,
    PodSummary,
    compute_status,
    transition_events,
)

TP_ERROR = ("infergrid-worker serve: error: tensor_parallel_size 3 does not divide the model's "
            "num_attention_heads 4; valid tensor_parallel_size values for this model: 1, 2, 4")
# What FallbackToLogsOnError puts in the message: the log's tail, the worker's own error line last but one.
LOG_TAIL = ("2026-01-01 00:00:00,000 INFO infergrid.worker: loading /models/tiny\n"
            "Traceback hint: see --help\n"
            f"{TP_ERROR}\n"
            "\n")
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def terminated(code=2, message=LOG_TAIL, reason="Error"):
    return {"terminated": {"exitCode": code, "reason": reason, "message": message,
                           "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:00:03Z"}}


def worker_status(state, last_state=None, started=False, ready=False, restarts=1):
    return {"name": "worker", "ready": ready, "started": started, "restartCount": restarts,
            "state": state, "lastState": last_state or {}}


def pod_body(*containers, name="tp-worker-abc"):
    return {"metadata": {"name": name}, "status": {
        "phase": "Running", "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": list(containers)}}


BACKING_OFF = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s restarting failed container"}}


def test_one_line_keeps_the_last_line_that_mentions_error():
    assert one_line(LOG_TAIL) == TP_ERROR
    assert one_line("first Error\nsecond error\nbye\n") == "second error"
    assert one_line("no problem here\nlast words\n") == "last words"
    assert one_line("") == "" and one_line(None) == ""
    assert len(one_line("error " + "x" * 2000)) == 512


def test_a_refused_configuration_is_a_config_error_naming_the_workers_message():
    failure = container_failure(worker_status(BACKING_OFF, terminated(2)))
    assert failure is not None
    assert failure.reason == "WorkerConfigError"
    assert failure.message == f"container worker exited with code 2: {TP_ERROR}"


def test_a_container_that_is_down_right_now_reports_its_own_exit():
    failure = container_failure(worker_status(terminated(2), restarts=0))
    assert failure is not None and failure.reason == "WorkerConfigError"


def test_other_exit_codes_are_a_crash_loop_and_fall_back_to_the_kubelet_reason():
    failure = container_failure(worker_status(BACKING_OFF, terminated(137, message="", reason="OOMKilled")))
    assert failure is not None
    assert failure.reason == "WorkerCrashLoop"
    assert failure.message == "container worker exited with code 137: OOMKilled"


def test_restarted_but_not_yet_started_still_reports_the_last_exit():
    running = {"running": {"startedAt": "2026-01-01T00:00:05Z"}}
    failure = container_failure(worker_status(running, terminated(2), started=False))
    assert failure is not None and failure.reason == "WorkerConfigError"


@pytest.mark.parametrize("status", [
    worker_status({"running": {}}, terminated(1), started=True, ready=False),  # up again since (readiness blip)
    worker_status({"running": {}}, terminated(1), started=True, ready=True),
    worker_status({"running": {}}, None, started=False, restarts=0),  # first start, still loading
    worker_status({"terminated": {"exitCode": 0, "reason": "Completed"}}, restarts=0),  # a finished init container
    worker_status({"waiting": {"reason": "ContainerCreating"}}, None, restarts=0),
])
def test_healthy_or_recovered_containers_report_nothing(status):
    assert container_failure(status) is None


def test_pod_summary_carries_the_failure_and_status_goes_not_ready_with_an_event():
    summary = PodSummary.from_body(pod_body(worker_status(BACKING_OFF, terminated(2), restarts=3)))
    assert summary.broken_reason == "WorkerConfigError"
    assert TP_ERROR in (summary.broken_message or "")
    deploy = DeploymentSummary(generation=1, observed_generation=1, spec_replicas=1, replicas=1, ready_replicas=0,
                               updated_replicas=1, template_hash="h", progress_deadline_exceeded=False)
    observed = Observed(generation=1, desired_replicas=1, desired_hash="h", gpus_per_pod=3,
                        gpu_resource_name="nvidia.com/gpu", selector="s", endpoint="e", deployment=deploy,
                        pods=(summary,))
    status = compute_status(observed, None, T0)
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Degraded"]["status"] == "True" and conds["Degraded"]["reason"] == "WorkerConfigError"
    assert conds["Degraded"]["message"] == \
        f"1 worker pod(s) failing; tp-worker-abc: container worker exited with code 2: {TP_ERROR}"
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "WorkerConfigError"
    assert "tensor_parallel_size" in conds["Ready"]["message"]
    events = transition_events(None, status)
    assert [(e.type, e.reason) for e in events] == [("Warning", "WorkerConfigError")]
    assert TP_ERROR in events[0].message
    # The next restart cycle (running, not yet started) changes nothing: no status write, no new Event.
    restarted = worker_status({"running": {"startedAt": "t"}}, terminated(2), started=False, restarts=4)
    again = compute_status(dataclasses.replace(observed, pods=(PodSummary.from_body(pod_body(restarted)),)),
                           status, T0 + datetime.timedelta(seconds=20))
    assert again == status and transition_events(status, again) == []


def test_a_config_error_is_named_before_other_pods_crashes():
    crash = PodSummary.from_body(pod_body(worker_status(BACKING_OFF, terminated(1, "segfault")), name="a-pod"))
    refused = PodSummary.from_body(pod_body(worker_status(BACKING_OFF, terminated(2)), name="b-pod"))
    observed = Observed(generation=1, desired_replicas=2, desired_hash="h", gpus_per_pod=1,
                        gpu_resource_name="nvidia.com/gpu", selector="s", endpoint="e", deployment=None,
                        pods=(crash, refused))
    degraded = {c["type"]: c for c in compute_status(observed, None, T0)["conditions"]}["Degraded"]
    assert degraded["reason"] == "WorkerConfigError" and degraded["message"].startswith("2 worker pod(s) failing; b-pod")
