"""A worker that refuses its configuration is reported in the InferenceService's status and Events.

First with a kubelet's pod status written by hand (what any kubelet reports for a FallbackToLogsOnError
container), then end to end: the pod runner runs the real `infergrid-worker serve` with a tensor parallel
size the model's attention heads do not divide, the worker exits 2 with its error line, and the operator
turns that into Ready=False / Degraded=WorkerConfigError.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from operator_cluster import (
    apply_isvc,
    condition,
    events_for,
    get_isvc,
    set_routers_ready,
    wait_for,
    worker_pods,
)

TP_ERROR = ("infergrid-worker serve: error: tensor_parallel_size 3 does not divide the model's "
            "num_attention_heads 4; valid tensor_parallel_size values for this model: 1, 2, 4")


def patch_worker_status(cp, ns: str, pod: dict, container_status: dict, ready: bool) -> None:
    """Write pods/status the way a kubelet does (the whole containerStatuses list, Ready conditions)."""
    flag = "True" if ready else "False"
    status = {"conditions": [{"type": "Ready", "status": flag}, {"type": "ContainersReady", "status": flag}],
              "containerStatuses": [{"name": "worker", "image": pod["spec"]["containers"][0]["image"],
                                     "imageID": "", **container_status}]}
    cp.client.strategic_patch(f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}/status",
                              {"status": status})


def test_a_terminated_worker_message_reaches_degraded_ready_and_events(control_plane, k8s_namespace, operator):
    cp, ns = control_plane, k8s_namespace
    apply_isvc(cp, ns, "tp", {"model": {"source": "file:///models/tiny"}, "replicas": 1})
    pod = wait_for(lambda: next((p for p in worker_pods(cp, ns, "tp") if (p.get("status") or {}).get("podIP")),
                                None), 30, "a running worker pod")
    log_tail = f"INFO loading /models/tiny\n{TP_ERROR}\n"
    last_state = {"terminated": {"exitCode": 2, "reason": "Error", "message": log_tail,
                                 "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:00:03Z"}}
    patch_worker_status(cp, ns, pod, {
        "ready": False, "started": False, "restartCount": 2, "lastState": last_state,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s restarting failed container"}},
    }, ready=False)
    isvc = wait_for(lambda: (i := get_isvc(cp, ns, "tp")) and condition(i, "Degraded").get("reason")
                    == "WorkerConfigError" and i, 30, "Degraded=WorkerConfigError")
    degraded = condition(isvc, "Degraded")
    assert degraded["status"] == "True"
    assert degraded["message"] == \
        f"1 worker pod(s) failing; {pod['metadata']['name']}: container worker exited with code 2: {TP_ERROR}"
    ready = condition(isvc, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "WorkerConfigError")
    assert TP_ERROR in ready["message"]
    event = wait_for(lambda: [e for e in events_for(cp, ns, "tp") if e["reason"] == "WorkerConfigError"], 15,
                     "a WorkerConfigError Event")
    assert event[0]["type"] == "Warning" and TP_ERROR in event[0]["message"]

    # The container comes up and passes its probes: the lastState a kubelet keeps no longer degrades the service.
    patch_worker_status(cp, ns, pod, {
        "ready": True, "started": True, "restartCount": 3, "lastState": last_state,
        "state": {"running": {"startedAt": "2026-01-01T00:01:00Z"}},
    }, ready=True)
    set_routers_ready(cp, ns, "tp")  # Ready also needs the endpoint's router
    isvc = wait_for(lambda: (i := get_isvc(cp, ns, "tp")) and condition(i, "Ready").get("status") == "True" and i,
                    30, "Ready=True after the worker came up")
    assert condition(isvc, "Degraded")["status"] == "False"
    stored = cp.client.get(f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}")
    assert stored["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 2  # still recorded


@pytest.fixture(scope="module")
def six_head_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama checkpoint (tokenizer from make-tiny-model) re-made with 6 attention heads, 2 KV heads."""
    out = tmp_path_factory.mktemp("models") / "tiny-6-heads"
    script = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from infergrid.worker.tiny_model import make_tiny_model
out = make_tiny_model(sys.argv[1], "llama")
config = LlamaConfig.from_pretrained(out)
config.update(dict(hidden_size=48, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2,
                   head_dim=8))
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
"""
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (6, 2)
    return out


def test_a_tensor_parallel_size_the_model_cannot_use_is_reported_within_60s(
        control_plane, k8s_namespace, operator, make_pod_runner, six_head_model):
    cp, ns = control_plane, k8s_namespace
    runner = make_pod_runner(namespace=ns)
    started = time.monotonic()
    apply_isvc(cp, ns, "tp4", {"model": {"source": f"file://{six_head_model}"},
                               "engine": {"tensorParallelSize": 4, "maxModelLen": 256}, "replicas": 1})
    isvc = wait_for(lambda: (i := get_isvc(cp, ns, "tp4")) and condition(i, "Degraded").get("reason")
                    == "WorkerConfigError" and i, 60, "Degraded=WorkerConfigError from the real worker")
    elapsed = time.monotonic() - started
    print(f"apply -> WorkerConfigError reported: {elapsed:.1f}s")
    degraded, ready = condition(isvc, "Degraded"), condition(isvc, "Ready")
    expected = ("tensor_parallel_size 4 does not divide the model's num_attention_heads 6; "
                "valid tensor_parallel_size values for this model: 1, 2")
    assert expected in degraded["message"], degraded["message"]
    assert "exited with code 2: infergrid-worker serve: error:" in degraded["message"]
    assert "\n" not in degraded["message"]
    assert (ready["status"], ready["reason"]) == ("False", "WorkerConfigError")
    assert "tensor_parallel_size" in ready["message"]
    (pod,) = worker_pods(cp, ns, "tp4")
    last = pod["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert last["exitCode"] == 2 and expected in last["message"]  # the pod runner's FallbackToLogsOnError
    assert expected in runner.log_path(ns, pod["metadata"]["name"]).read_text()
    wait_for(lambda: [e for e in events_for(cp, ns, "tp4") if e["reason"] == "WorkerConfigError"
                      and e["type"] == "Warning"], 15, "a WorkerConfigError Warning Event")
