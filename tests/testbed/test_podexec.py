"""Pure parts of the pod runner: env, `$(VAR)` expansion, command lookup (no control plane)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from infergrid.testbed.podexec import PodSpecError, container_env, expand, field_ref, resolve_argv
from infergrid.testbed.probes import ProbeState

POD = {
    "metadata": {"name": "w-0", "namespace": "team-a", "uid": "u1", "labels": {"app": "w"}},
    "spec": {"nodeName": "gpu-node-0"},
    "status": {"podIP": "10.244.0.5", "hostIP": "10.243.0.1"},
}


def test_expand_follows_kubernetes_rules() -> None:
    env = {"A": "x", "B": "y"}
    assert expand("$(A)-$(B)", env) == "x-y"
    assert expand("$(MISSING)", env) == "$(MISSING)"
    assert expand("$$(A)", env) == "$(A)"
    assert expand("cost $5", env) == "cost $5"


def test_env_resolves_downward_api_and_earlier_vars() -> None:
    container = {"env": [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "URL", "value": "http://$(POD_IP):8000/$(NS)"},
    ]}
    env = container_env(POD, container, client=None)
    assert env == {"POD_IP": "10.244.0.5", "NAME": "w-0", "NS": "team-a", "URL": "http://10.244.0.5:8000/team-a"}
    assert field_ref(POD, "metadata.labels['app']") == "w"
    with pytest.raises(PodSpecError):
        field_ref(POD, "spec.nope")


def test_argv_expands_and_finds_the_venv_python() -> None:
    container = {"command": ["python", "-m", "http.server"], "args": ["--bind", "$(POD_IP)", "8000"]}
    search = str(Path(sys.executable).parent)
    argv = resolve_argv(container, {"POD_IP": "10.244.0.5"}, search)
    assert argv == [str(Path(sys.executable).parent / "python"), "-m", "http.server", "--bind", "10.244.0.5", "8000"]


def test_image_entrypoint_maps_to_a_local_executable(tmp_path: Path) -> None:
    exe = tmp_path / "infergrid-worker"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    container = {"image": "ghcr.io/x/infergrid-worker:0.1", "args": ["serve", "--port", "8000"]}
    assert resolve_argv(container, {}, str(tmp_path)) == [str(exe), "serve", "--port", "8000"]
    with pytest.raises(PodSpecError):
        resolve_argv({"image": "busybox", "args": []}, {}, str(tmp_path))


def test_probe_thresholds() -> None:
    s = ProbeState({"periodSeconds": 1, "failureThreshold": 2, "successThreshold": 2}, started=0.0)
    assert s.ok is False
    assert s.record(True, now=0) is False  # one success of two
    assert s.record(True, now=1) is True
    assert s.record(False, now=2) is True  # one failure of two
    assert s.record(False, now=3) is False
    assert s.due(3.5) is False and s.due(4.0) is True


def test_capped_probe_period_keeps_the_failure_budget() -> None:
    # startup: 10 s period x 6 failures = 60 s budget; capped to 1 s it needs 60 failures
    s = ProbeState({"periodSeconds": 10, "failureThreshold": 6}, started=0.0, period_cap=1.0)
    assert s.period == 1.0 and s.failure_threshold == 60
    for i in range(59):
        s.record(False, now=i)
    assert s.failures == 59 and s.failure_threshold > s.failures
