"""Shared pytest setup for the end-to-end scenarios.

The test-bed fixtures (control_plane, k8s_namespace, pod_runner, make_pod_runner) come from the plugin;
the ones here add what every scenario needs: the CRDs, a tiny checkpoint, an operator subprocess.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from isvc_support import OperatorProcess, install_crds

from infergrid.testbed.controlplane import ControlPlane
from infergrid.testbed.netns import in_pod_netns
from infergrid.testbed.podrunner import Backoff, PodRunner
from infergrid.testbed.waiting import wait_for

pytest_plugins = ["infergrid.testbed.pytest_plugin"]


@pytest.fixture(scope="session")
def isvc_crds(control_plane: ControlPlane) -> ControlPlane:
    """The control plane with crds/ installed and established."""
    install_crds(control_plane)
    return control_plane


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint made by `infergrid-worker make-tiny-model`."""
    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    worker = Path(sys.executable).parent / "infergrid-worker"
    subprocess.run([str(worker), "make-tiny-model", str(out), "--arch", "llama"], check=True,
                   capture_output=True, timeout=300)
    assert (out / "config.json").exists(), f"make-tiny-model wrote no config.json into {out}"
    return out


@pytest.fixture(scope="module")
def start_operator(isvc_crds: ControlPlane,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., OperatorProcess]]:
    """Factory: `start_operator([namespace, ...], metrics_port=0)` runs a standalone operator watching
    those namespaces (serving /metrics on 127.0.0.1:metrics_port unless it is 0).

    Every operator started is stopped (by process group) when the module ends; its log tail is printed.
    """
    started: list[OperatorProcess] = []
    workdir = tmp_path_factory.mktemp("operator")

    def start(namespaces: list[str], metrics_port: int = 0) -> OperatorProcess:
        proc = OperatorProcess(isvc_crds, workdir / f"operator-{len(started)}.log", namespaces, metrics_port)
        started.append(proc)
        return proc.start()

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()
            print(f"--- operator log tail ({proc.log_path})\n{proc.log_tail(30)}")


@pytest.fixture(scope="module")
def namespace(isvc_crds: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace for the module's services (its `default` ServiceAccount exists); deleted after."""
    base = re.sub(r"[^a-z0-9]+", "-", request.module.__name__.rsplit(".", 1)[-1].lower()).strip("-")[:40]
    name = f"{base}-{secrets.token_hex(3)}"
    client = isvc_crds.client
    client.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    wait_for(lambda: client.get(f"/api/v1/namespaces/{name}/serviceaccounts/default", ok_missing=True), 30,
             f"ServiceAccount {name}/default")
    try:
        yield name
    finally:
        client.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture(scope="module")
def runner(isvc_crds: ControlPlane, namespace: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodRunner]:
    """A pod runner (the kubelet stand-in) for the module's namespace; every process stopped after."""
    if not in_pod_netns():
        pytest.fail("run inside the pod netns: python -m infergrid.testbed.cli exec -- python -m pytest e2e",
                    pytrace=False)
    pods = PodRunner(isvc_crds.kubeconfig, workdir=tmp_path_factory.mktemp("pods"), namespace=namespace,
                     backoff=Backoff(first=0.5, cap=5.0), probe_period_cap=1.0).start()
    try:
        yield pods
    finally:
        pods.stop()
