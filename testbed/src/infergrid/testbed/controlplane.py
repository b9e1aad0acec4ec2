"""A real Kubernetes control plane as local processes: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and KWOK, with fake GPU nodes.

    with ControlPlane() as cp:
        cp.kubectl("get", "nodes")

Everything binds free ports on 127.0.0.1 and lives in one temporary directory; every process is
started in its own process group and stopped by pid (also at interpreter exit, on SIGTERM, and —
through PR_SET_PDEATHSIG — if the starting process dies).
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from infergrid.testbed import kwokstages, paths
from infergrid.testbed.kubeapi import KubeClient
from infergrid.testbed.netns import POD_CIDR, SERVICE_CIDR, in_pod_netns
from infergrid.testbed.procs import ManagedProcess, free_port, spawn

#: Fake nodes' InternalIPs (pods' hostIP); nothing listens there and nothing should connect to them.
NODE_IP_BASE = "10.243.0.0"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"


class ControlPlaneError(RuntimeError):
    """The control plane failed to start; the message carries the failing component's log tail."""


def node_manifest(name: str, pod_cidr: str, gpus: int = 8, node_ip: str | None = None) -> dict[str, Any]:
    """A fake GPU Node that KWOK manages (annotation + kwok:// providerID)."""
    resources = {"cpu": "64", "memory": "512Gi", "pods": "110", "ephemeral-storage": "1Ti", GPU_RESOURCE: str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {FAKE_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                "nvidia.com/gpu.count": str(gpus),
            },
        },
        "spec": {"providerID": f"kwok://{name}", "podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {
            "capacity": resources,
            "allocatable": dict(resources),
            "addresses": [{"type": "Hostname", "address": name}]
            + ([{"type": "InternalIP", "address": node_ip}] if node_ip else []),
        },
    }


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + KWOK with fake GPU nodes.

    Attributes after :meth:`start`: ``kubeconfig`` (admin, token auth), ``server`` (https URL),
    ``env`` (os.environ plus KUBECONFIG and the binaries first on PATH), ``bin_dir``, ``workdir``.
    """

    COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")

    def __init__(
        self,
        bin_dir: Path | None = None,
        workdir: Path | None = None,
        api_port: int | None = None,
        nodes: int = 2,
        gpus_per_node: int = 8,
        node_prefix: str = "gpu-node",
        keep_workdir: bool | None = None,
        kube_proxy: bool = False,
    ):
        self.bin_dir = Path(bin_dir) if bin_dir else paths.bin_dir()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="infergrid-testbed-"))
        self.api_port = api_port or free_port()
        self.node_names = [f"{node_prefix}-{i}" for i in range(nodes)]
        self.gpus_per_node = gpus_per_node
        # NOTE: one kube-proxy per pod network namespace (they would share one nftables table).
        self.kube_proxy = kube_proxy
        self.keep_workdir = (
            keep_workdir if keep_workdir is not None else os.environ.get("INFERGRID_TESTBED_KEEP") == "1"
        )
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.token = secrets.token_hex(16)
        self.procs: dict[str, ManagedProcess] = {}
        self.start_seconds: float | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self._client: KubeClient | None = None
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        self.env = env

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def check_binaries(self) -> None:
        """Raise ControlPlaneError naming every binary that is missing from bin_dir."""
        needed = (*self.COMPONENTS, "kubectl", *(["kube-proxy"] if self.kube_proxy else []))
        gone = [b for b in needed if not os.access(self.bin_dir / b, os.X_OK)]
        if gone:
            raise ControlPlaneError(
                f"test bed binaries missing from {self.bin_dir}: {', '.join(gone)}. "
                "Build them with `make testbed-build` (python -m infergrid.testbed.cli build)."
            )

    def start(self, timeout: float = 90.0) -> ControlPlane:
        """Start every component, create the fake nodes and wait until the cluster is usable."""
        self.check_binaries()
        t0 = time.monotonic()
        atexit.register(self.stop)
        _install_sigterm_handler()
        try:
            self._write_credentials()
            self._start_etcd()
            self._start_apiserver()
            self._wait(self._apiserver_ready, timeout, "kube-apiserver /readyz", "kube-apiserver")
            self._write_kubeconfig()
            self._client = KubeClient(self.kubeconfig)
            for name in self.node_names:  # before KWOK starts, so it sees them at once
                self._create_node(name)
            self._start_controller_manager()
            self._start_scheduler()
            self._start_kwok()
            self._wait(self._nodes_ready, timeout - (time.monotonic() - t0), "fake nodes Ready and untainted", "kwok")
            self._wait(self._default_sa_exists, timeout - (time.monotonic() - t0),
                       "default ServiceAccount", "kube-controller-manager")
            self._wait(self._scheduler_healthy, timeout - (time.monotonic() - t0), "kube-scheduler /healthz",
                       "kube-scheduler")
            if self.kube_proxy:
                self._start_kube_proxy()
                self._wait(self._kube_proxy_healthy, timeout - (time.monotonic() - t0), "kube-proxy /healthz",
                           "kube-proxy")
        except BaseException:
            self.keep_workdir = True
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Stop every process this object started (reverse order), by pid; remove the workdir."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        for name in reversed(list(self.procs)):
            self.procs[name].stop(timeout=10.0)
        if self._client is not None:
            self._client.close()
        atexit.unregister(self.stop)
        if self._own_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def stop_component(self, name: str, timeout: float = 10.0) -> None:
        """Stop one component (one of COMPONENTS, e.g. "kube-apiserver") by pid, to simulate an outage.

        The rest keep running; :meth:`start_component` brings it back with the same flags and ports.
        """
        proc = self._component(name)
        proc.stop(timeout=timeout)
        if proc.alive():
            raise ControlPlaneError(f"{name} (pid {proc.pid}) did not stop")

    def start_component(self, name: str, timeout: float = 60.0) -> None:
        """Start a component stopped by :meth:`stop_component` again and wait until it serves.

        kube-apiserver is waited for on /readyz, kube-scheduler on /healthz; the others until the API
        server answers again with them running. A component that is still running is left alone.
        """
        proc = self._component(name)
        if self._stopped:
            raise ControlPlaneError(f"cannot start {name}: the control plane was stopped")
        if not proc.alive():
            self._spawn(name, proc.argv)
        check = {"kube-apiserver": self._apiserver_ready, "kube-scheduler": self._scheduler_healthy}.get(
            name, self._apiserver_ready)
        self._wait(check, timeout, f"{name} serving again after a restart", name)

    def pids(self) -> dict[str, int]:
        """Pid of each component."""
        return {name: p.pid for name, p in self.procs.items()}

    # ------------------------------------------------------------------ helpers for tests

    @property
    def client(self) -> KubeClient:
        """A small REST client with admin rights (see kubeapi.KubeClient)."""
        if self._client is None:
            self._client = KubeClient(self.kubeconfig)
        return self._client

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the test bed's kubectl with the admin kubeconfig; raise with its stderr when `check`."""
        argv = [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args]
        res = subprocess.run(argv, input=input, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, argv, res.stdout, res.stderr)
        return res

    def set_pod_ready(self, namespace: str, name: str, ready: bool = True) -> None:
        """Play kubelet for one pod: set its Ready/ContainersReady conditions and containers' ready."""
        from infergrid.testbed.podstatus import set_ready

        set_ready(self.client, namespace, name, ready)

    def log_path(self, component: str) -> Path:
        """The log file of one component."""
        return self.workdir / "logs" / f"{component}.log"

    # ------------------------------------------------------------------ internals

    def _component(self, name: str) -> ManagedProcess:
        if name not in self.procs:
            raise ValueError(f"unknown component {name!r}; started: {', '.join(self.procs) or 'none'}")
        return self.procs[name]

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _spawn(self, name: str, argv: list[str], extra_path: str | None = None) -> None:
        env = self.env if extra_path is None else {**self.env, "PATH": f"{self.env['PATH']}{os.pathsep}{extra_path}"}
        self.procs[name] = spawn(name, argv, self.log_path(name), env=env, cwd=self.workdir,
                                 die_with_parent=threading.current_thread() is threading.main_thread())

    def _write_credentials(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        (self.workdir / "tokens.csv").write_text(f'{self.token},admin,admin-uid,"system:masters"\n')
        key, pub = pki / "sa.key", pki / "sa.pub"
        for argv in (["openssl", "genrsa", "-out", str(key), "2048"],
                     ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)]):
            res = subprocess.run(argv, capture_output=True, text=True)
            if res.returncode != 0:
                raise ControlPlaneError(f"{' '.join(argv)} failed: {res.stderr}")

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._spawn("etcd", [
            self._bin("etcd"),
            "--name=testbed",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=testbed=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ])

    def _start_apiserver(self) -> None:
        pki = self.workdir / "pki"
        self._spawn("kube-apiserver", [
            self._bin("kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            f"--cert-dir={pki}",
            f"--secure-port={self.api_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            f"--token-auth-file={self.workdir / 'tokens.csv'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--v=1",
        ])

    def _component_kubeconfig_flags(self) -> list[str]:
        kc = str(self.kubeconfig)
        return [f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}"]

    def _start_controller_manager(self) -> None:
        self.kcm_port = free_port()
        self._spawn("kube-controller-manager", [
            self._bin("kube-controller-manager"),
            *self._component_kubeconfig_flags(),
            "--leader-elect=false",
            "--controllers=*",
            f"--service-account-private-key-file={self.workdir / 'pki' / 'sa.key'}",
            f"--root-ca-file={self.workdir / 'pki' / 'apiserver.crt'}",
            "--use-service-account-credentials=false",
            f"--cluster-cidr={POD_CIDR}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allocate-node-cidrs=false",
            f"--secure-port={self.kcm_port}",
            "--bind-address=127.0.0.1",
            "--profiling=false",
            "--v=1",
        ])

    def _start_scheduler(self) -> None:
        self.scheduler_port = free_port()
        self._spawn("kube-scheduler", [
            self._bin("kube-scheduler"),
            *self._component_kubeconfig_flags(),
            "--leader-elect=false",
            f"--secure-port={self.scheduler_port}",
            "--bind-address=127.0.0.1",
            "--profiling=false",
            "--v=1",
        ])

    def _start_kwok(self) -> None:
        cfg = self.workdir / "kwok.yaml"
        cfg.write_text(kwokstages.kwok_config())
        self._spawn("kwok", [
            self._bin("kwok"),
            f"--config={cfg}",
            f"--kubeconfig={self.kubeconfig}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
            f"--cidr={POD_CIDR}",
            "--node-lease-duration-seconds=40",
        ])

    def _write_kubeconfig(self) -> None:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "testbed", "cluster": {
                "server": self.server,
                "certificate-authority-data": _b64((self.workdir / "pki" / "apiserver.crt").read_bytes()),
            }}],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": "admin"}}],
            "current-context": "testbed",
        }
        tmp = self.kubeconfig.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(cfg))
        tmp.chmod(0o600)
        tmp.replace(self.kubeconfig)

    def _create_node(self, name: str) -> None:
        index = self.node_names.index(name)
        net = list(ipaddress.ip_network(POD_CIDR).subnets(new_prefix=24))[index]
        # KWOK hands out pod IPs starting at the podCIDR's address, so "10.244.N.1/24" (same subnet,
        # the API server accepts it) makes the first pod 10.244.N.1 rather than the network address.
        cidr = f"{net.network_address + 1}/{net.prefixlen}"
        node_ip = str(ipaddress.ip_address(NODE_IP_BASE) + index + 1)
        self.client.create("/api/v1/nodes", node_manifest(name, cidr, self.gpus_per_node, node_ip))

    # readiness checks ------------------------------------------------

    def _start_kube_proxy(self) -> None:
        """kube-proxy in nftables mode: Service ClusterIPs work for every process in the pod netns."""
        if not in_pod_netns():
            raise ControlPlaneError("kube-proxy runs only inside the pod network namespace (it would rewrite "
                                    "the host's nftables): start the test bed through `cli exec`/`cli up`")
        path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
        if shutil.which("nft", path=path) is None:
            raise ControlPlaneError("kube-proxy needs the `nft` tool: install Debian's nftables and conntrack "
                                    "packages (`make testbed-build` does so as root)")
        self.kube_proxy_health_port = free_port()
        self._spawn("kube-proxy", [
            self._bin("kube-proxy"),
            f"--kubeconfig={self.kubeconfig}",
            "--proxy-mode=nftables",
            f"--hostname-override={self.node_names[0]}",
            f"--cluster-cidr={POD_CIDR}",
            # the namespace's conntrack table size is read-only: do not try to set it
            "--conntrack-max-per-core=0",
            f"--metrics-bind-address=127.0.0.1:{free_port()}",
            f"--healthz-bind-address=127.0.0.1:{self.kube_proxy_health_port}",
            "--v=1",
        ], extra_path=path)

    def _kube_proxy_healthy(self) -> bool:
        try:
            r = httpx.get(f"http://127.0.0.1:{self.kube_proxy_health_port}/healthz", timeout=2)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def _apiserver_ready(self) -> bool:
        ca = self.workdir / "pki" / "apiserver.crt"
        if not ca.exists():
            return False
        ctx = ssl.create_default_context(cafile=str(ca))
        try:
            r = httpx.get(f"{self.server}/readyz", verify=ctx, timeout=2,
                          headers={"Authorization": f"Bearer {self.token}"})
        except (httpx.HTTPError, ssl.SSLError, OSError):
            return False
        return r.status_code == 200

    def _nodes_ready(self) -> bool:
        items = (self.client.get("/api/v1/nodes") or {}).get("items", [])
        ready = 0
        for node in items:
            if node["metadata"]["name"] not in self.node_names:
                continue
            conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
            taints = [t["key"] for t in node.get("spec", {}).get("taints", []) or []]
            if conds.get("Ready") == "True" and not any(k.startswith("node.kubernetes.io/") for k in taints):
                ready += 1
        return ready == len(self.node_names)

    def _default_sa_exists(self) -> bool:
        return self.client.get("/api/v1/namespaces/default/serviceaccounts/default", ok_missing=True) is not None

    def _scheduler_healthy(self) -> bool:
        try:
            r = httpx.get(f"https://127.0.0.1:{self.scheduler_port}/healthz", verify=False, timeout=2)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def _wait(self, check: Callable[[], bool], timeout: float, what: str, component: str) -> None:
        deadline = time.monotonic() + max(timeout, 1.0)
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if not proc.alive():
                    raise ControlPlaneError(
                        f"{name} exited (code {proc.popen.returncode}) while waiting for {what}; "
                        f"log {proc.log_path}:\n{proc.log_tail()}"
                    )
            try:
                if check():
                    return
            except Exception:  # noqa: BLE001 - the API may not answer yet
                pass
            time.sleep(0.1)
        proc = self.procs.get(component)
        tail = f"\nlog {proc.log_path}:\n{proc.log_tail()}" if proc else ""
        raise ControlPlaneError(f"timed out waiting for {what}{tail}")


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _install_sigterm_handler() -> None:
    """Turn SIGTERM into SystemExit (so atexit stops our processes) if nobody handles it yet."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        def _exit(signum: int, frame: object) -> None:
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, _exit)

