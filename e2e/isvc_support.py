"""Helpers for the end-to-end scenarios: the operator as a subprocess, polling, pod IPs, sockets, metrics.

Plain functions and one small class; the fixtures that use them live in e2e/conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, TypeVar

import httpx

from infergrid.testbed.controlplane import ControlPlane
from infergrid.testbed.procs import free_port, terminate_pid
from infergrid.testbed.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CRDS = REPO / "crds"
ISVC_API = "/apis/infergrid.dev/v1alpha1"

T = TypeVar("T")



def install_crds(cp: ControlPlane) -> None:
    """Server-side apply everything in crds/ and wait until the API serves it."""
    cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/inferenceservices.infergrid.dev")


def get_isvc(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any] | None:
    """The InferenceService object, or None when it does not exist."""
    return cp.client.get(f"{ISVC_API}/namespaces/{namespace}/inferenceservices/{name}", ok_missing=True)


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    """One status condition (empty dict when absent)."""
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return {}


def ready_pods(cp: ControlPlane, namespace: str, selector: str) -> list[dict[str, Any]]:
    """Pods matching `selector` that are Ready, have a pod IP and are not terminating."""
    listing = cp.client.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector=selector) or {}
    found = []
    for pod in listing.get("items", []):
        status = pod.get("status") or {}
        conds = {c["type"]: c["status"] for c in status.get("conditions") or []}
        if conds.get("Ready") == "True" and status.get("podIP") and not pod["metadata"].get("deletionTimestamp"):
            found.append(pod)
    return found


def listening_pids(ip: str, port: int) -> set[int]:
    """Pids of processes (in this network namespace) holding a TCP socket that listens on ip:port."""
    want = f"{_hex_ipv4(ip)}:{port:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want and fields[3] == "0A":  # 0A = TCP_LISTEN
            inodes.add(fields[9])
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    pids.add(int(proc.name))
                    break
        except OSError:  # gone, or not ours to look at
            continue
    return pids


def _hex_ipv4(ip: str) -> str:
    # /proc/net/tcp prints the address as a little-endian 32-bit hex number.
    return "".join(f"{int(part):02X}" for part in reversed(ip.split(".")))


def process_tree(pid: int) -> set[int]:
    """`pid` and all its descendants (from /proc/*/stat)."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grew = {pid}, True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in tree and child not in tree:
                tree.add(child)
                grew = True
    return tree


def prometheus_samples(text: str, name: str) -> dict[str, float]:
    """Samples of one metric from a Prometheus text exposition: `{labels}` -> value."""
    samples = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, _, value = line.rpartition(" ")
            samples[series[len(name):]] = float(value)
    return samples


def scrape(ip: str, port: int = 8000) -> str:
    """GET http://ip:port/metrics (no proxies: the pod IP only exists in this namespace)."""
    with httpx.Client(trust_env=False, timeout=10) as client:
        response = client.get(f"http://{ip}:{port}/metrics")
    response.raise_for_status()
    return response.text


class OperatorProcess:
    """`infergrid-operator --standalone` as a subprocess with its own process group and log file."""

    def __init__(self, cp: ControlPlane, log_path: Path, namespaces: list[str], metrics_port: int = 0) -> None:
        self.cp, self.log_path, self.namespaces = cp, log_path, namespaces
        self.metrics_port = metrics_port  # 0: no /metrics server
        self.health_port = free_port()
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        """Start it and wait for its liveness endpoint."""
        argv = [str(Path(sys.executable).parent / "infergrid-operator"), "--standalone", "--bind=127.0.0.1",
                f"--metrics-port={self.metrics_port}", f"--health-port={self.health_port}", "--log-format=plain",
                *[f"--namespace={ns}" for ns in self.namespaces]]
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(argv, env=self.cp.env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(self.healthy, timeout, "the operator's /healthz")
        return self

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.popen is not None and self.popen.poll() is None

    def healthy(self) -> bool:
        """True once /healthz answers 200; raises if the process died."""
        if not self.alive():
            code = self.popen.returncode if self.popen else None
            raise AssertionError(f"infergrid-operator exited with {code}:\n{self.log_tail()}")
        try:
            with httpx.Client(trust_env=False, timeout=2) as client:
                return client.get(f"http://127.0.0.1:{self.health_port}/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after 15 s."""
        if self.popen is not None and self.alive():
            terminate_pid(self.popen.pid, timeout=15, group=True, popen=self.popen)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of its log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
