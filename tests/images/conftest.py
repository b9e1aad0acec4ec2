"""Fixtures for the image smoke tests: the built images, containers cleaned up after each test, a tiny
model, and a background test bed whose API server the host's containers reach through its forwarder.

These tests run on the host (docker's containers use the host network, bound to 127.0.0.1), not
inside the pod netns: `make images-test` runs them after `make images`.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from image_helpers import CHART, Images, TestBed, docker

from infergrid.testbed import cli


@pytest.fixture(scope="session")
def images() -> Images:
    """Both images, present in the local docker (fails, never skips: run `make images`)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    worker_repo, operator_repo = values["worker"]["image"]["repository"], values["operator"]["image"]["repository"]
    found = Images(version, f"{worker_repo}:{version}", f"{operator_repo}:{version}", worker_repo, operator_repo)
    for ref in (found.worker, found.operator):
        if docker("image", "inspect", ref, check=False).returncode != 0:
            pytest.fail(f"image {ref} is missing: run `make images`", pytrace=False)
    return found


@pytest.fixture
def containers() -> Iterator[Callable[..., str]]:
    """`run(*docker_run_args)` starts a detached container and returns its name; all removed after."""
    names: list[str] = []

    def run(*args: str) -> str:
        name = f"infergrid-test-{secrets.token_hex(4)}"
        docker("run", "-d", "--name", name, *args)
        names.append(name)
        return name

    yield run
    for name in names:
        logs = docker("logs", "--tail", "30", name, check=False)
        print(f"--- container {name} (tail)\n{logs.stdout}{logs.stderr}")
        docker("rm", "-f", name, check=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint, world-readable (the images run as non-root uids)."""
    out = tmp_path_factory.mktemp("tiny-model") / "tiny-llama"
    exe = Path(sys.executable).parent / "infergrid-worker"
    subprocess.run([str(exe), "make-tiny-model", str(out), "--arch", "llama"], check=True,
                   capture_output=True, timeout=300)
    for path in [out, *out.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out


@pytest.fixture(scope="session")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestBed]:
    """A fresh control plane (no CRDs) reachable from the host on 127.0.0.1; stopped after the session."""
    root = tmp_path_factory.mktemp("testbed")
    old = os.environ.get("INFERGRID_TESTBED_DIR")
    os.environ["INFERGRID_TESTBED_DIR"] = str(root)
    try:
        try:
            bed = cli.up(pod_runner=False)
        except RuntimeError as exc:
            pytest.fail(f"the test bed did not start: {exc}", pytrace=False)
        try:
            # the services' pods (workers and routers) run from the checkout; the operator runs from its image
            cli.start_in_netns("service-pod-runner", [
                sys.executable, "-m", "infergrid.testbed.podrunner",
                "--selector", "app.kubernetes.io/component in (worker,router)",
                "--workdir", str(root / "pods"), "--probe-period-cap", "1"])
            yield TestBed(root=bed.root, kubeconfig=bed.kubeconfig, env=dict(os.environ))
        finally:
            for log in sorted(bed.log_dir.glob("*.log")) if bed.log_dir.is_dir() else []:
                tail = log.read_text(errors="replace").splitlines()[-15:]
                print(f"--- {log.name} (tail)\n" + "\n".join(tail))
            cli.down()
    finally:
        if old is None:
            os.environ.pop("INFERGRID_TESTBED_DIR", None)
        else:
            os.environ["INFERGRID_TESTBED_DIR"] = old
