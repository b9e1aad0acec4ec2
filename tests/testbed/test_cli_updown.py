"""`cli up` / `cli nsexec` / `cli down`: a background test bed reachable from outside its namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infergrid.testbed import paths
from infergrid.testbed.procs import pid_alive

pytestmark = pytest.mark.controlplane


def cli(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infergrid.testbed.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_up_nsexec_down(tmp_path: Path) -> None:
    state = tmp_path / "bed"
    env = dict(os.environ, INFERGRID_TESTBED_DIR=str(state))
    up = cli("up", "--nodes", "1", env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        launch = json.loads((state / "launch.json").read_text())
        pids = json.loads((state / "state.json").read_text())["pids"]
        assert set(pids) >= {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok",
                             "pod-runner"}

        # from outside the bed's namespace: through the forwarder, with the same kubeconfig
        kubectl = str(paths.bin_dir() / "kubectl")
        out = subprocess.run([kubectl, f"--kubeconfig={state / 'kubeconfig'}", "get", "nodes", "-o", "name"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["node/gpu-node-0"]

        # nsexec enters the bed's own network namespace (not ours)
        probe = "import os; print(os.readlink('/proc/self/ns/net'), os.environ['KUBECONFIG'])"
        inside = cli("nsexec", "--", sys.executable, "-c", probe, env=env, timeout=30)
        assert inside.returncode == 0, inside.stderr
        net_inside, kubeconfig = inside.stdout.split()
        assert net_inside != os.readlink("/proc/self/ns/net")
        assert kubeconfig == str(state / "kubeconfig")
        assert cli("status", env=env, timeout=30).returncode == 0
    finally:
        down = cli("down", env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    everything = [launch["supervisor"], launch["forwarder"], *pids.values()]
    assert not [p for p in everything if pid_alive(p)]
    assert not (state / "state.json").exists()
    assert cli("status", env=env, timeout=30).returncode == 1
