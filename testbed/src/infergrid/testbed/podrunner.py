"""The pod runner: our stand-in for a kubelet on the KWOK fake nodes.

It watches pods and, for each one that KWOK made Running with a pod IP on a fake node, runs the
first container's command + args as a local process (see :mod:`infergrid.testbed.podexec`), with
its own process group, working directory and log file. Like a kubelet it

* runs readiness, liveness and startup probes against the pod IP and writes the pod's Ready /
  ContainersReady conditions and the container's status;
* restarts exited containers (restartPolicy Always / OnFailure) with exponential back-off
  (CrashLoopBackOff), or sets phase Succeeded / Failed (Never); the exit goes to
  ``lastState.terminated``, with the log's tail as ``message`` under FallbackToLogsOnError;
* on pod deletion runs the preStop hook, sends SIGTERM, waits up to the grace period, sends SIGKILL,
  and then deletes the pod object (grace 0), so a pod stays Terminating while its process drains.

It must run inside the pod network namespace (``cli exec`` / ``cli nsexec``) so processes can bind
pod IPs. Run it in-process (``PodRunner(...).start()``) or as ``python -m infergrid.testbed.podrunner``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infergrid.testbed import podexec, podstatus, podvolumes
from infergrid.testbed.controlplane import FAKE_NODE_ANNOTATION
from infergrid.testbed.kubeapi import ApiError, KubeClient
from infergrid.testbed.kwokstages import RUNNER_ANNOTATION
from infergrid.testbed.probes import ProbeState, run_probe
from infergrid.testbed.procs import ManagedProcess, spawn, terminate_pid

log = logging.getLogger("infergrid.testbed.podrunner")

#: How often a running pod's Secret/ConfigMap volumes are re-read (a kubelet: about a minute).
VOLUME_SYNC_SECONDS = 1.0


@dataclass(frozen=True)
class Backoff:
    """Restart back-off: first delay, doubling up to `cap` (kubelet: 10 s .. 300 s)."""

    first: float = 1.0
    cap: float = 30.0

    def delay(self, restarts: int) -> float:
        """Delay before restart number `restarts` (1-based)."""
        return min(self.cap, self.first * (2 ** max(0, restarts - 1)))


class PodProcess:
    """One pod's container process and its kubelet-like lifecycle (runs in its own thread)."""

    def __init__(self, runner: PodRunner, pod: dict[str, Any]):
        self.runner = runner
        self.pod = pod
        meta = pod["metadata"]
        self.namespace, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.container = pod["spec"]["containers"][0]
        self.dir = runner.workdir / self.namespace / f"{self.name}-{self.uid[:8]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / f"{self.container['name']}.log"
        self.proc: ManagedProcess | None = None
        self.pids: list[int] = []
        self.restarts = 0
        self._mounts: dict[str, str] = {}
        self._volumes_synced_at = 0.0
        self.ready = False
        self.error: str | None = None
        self._log_offset = 0
        self._started_at = ""
        self.finished = threading.Event()
        self.started = threading.Event()
        self._delete = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pod-{self.namespace}/{self.name}", daemon=True)

    # -------------------------------------------------------------- control from the runner

    def start(self) -> None:
        """Start the lifecycle thread."""
        self._thread.start()

    def update(self, pod: dict[str, Any]) -> None:
        """Keep the latest pod object (status patches are computed from it)."""
        self.pod = pod

    def delete(self) -> None:
        """The pod was deleted: run preStop, stop the process gracefully, then remove the pod."""
        self._delete.set()
        self._stop.set()

    def stop(self) -> None:
        """The runner stops: stop the process (no preStop), leave the pod object alone."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the lifecycle thread to finish."""
        self._thread.join(timeout)

    @property
    def pid(self) -> int | None:
        """Pid of the current process, if one runs."""
        return self.proc.pid if self.proc and self.proc.alive() else None

    # -------------------------------------------------------------- lifecycle thread

    def _api(self) -> KubeClient:
        return self.runner.client

    def _path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"

    def _patch(self, **kw: Any) -> None:
        try:
            out = podstatus.patch_status(self._api(), self.pod, **kw)
            if out:
                self.pod = out
        except ApiError as e:
            if e.status not in (404, 409, 422):
                log.warning("status patch for %s/%s failed: %s", self.namespace, self.name, e)

    def _claim(self, claim: bool) -> None:
        patch = {"metadata": {"uid": self.uid, "annotations": {RUNNER_ANNOTATION: self.runner.id if claim else None}}}
        try:
            self._api().merge_patch(self._path(), patch, ok_missing=True)
        except ApiError as e:
            log.debug("claim(%s) of %s/%s: %s", claim, self.namespace, self.name, e)

    def _run(self) -> None:
        try:
            self._lifecycle()
        except Exception as e:  # noqa: BLE001 - keep the runner alive, report on the pod's log
            self.error = f"{type(e).__name__}: {e}"
            log.exception("pod %s/%s", self.namespace, self.name)
            self._write_log(f"[pod-runner] error: {self.error}\n")
        finally:
            self._kill()
            if self._delete.is_set():
                self._remove_pod()
            elif self.runner.stopping:
                self._claim(False)  # so KWOK may delete it at once later
            self.finished.set()

    def _write_log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text)

    def _lifecycle(self) -> None:
        self._claim(True)
        try:
            env = podexec.container_env(self.pod, self.container, self._api())
            self._mounts = self._sync_volumes()
            env = {k: podvolumes.remap(v, self._mounts) for k, v in env.items()}
            kubeconfig = podvolumes.service_account_kubeconfig(self.pod, self._api(), self.dir / "kubeconfig")
            if kubeconfig is not None:
                env["KUBECONFIG"] = kubeconfig
            argv = podexec.resolve_argv(self.container, env, self.runner.search_path, self.runner.entrypoints)
            argv = [podvolumes.remap(a, self._mounts) for a in argv]
        except podexec.PodSpecError as e:
            self.error = str(e)
            self._write_log(f"[pod-runner] cannot run: {e}\n")
            self._patch(ready=False, container={"started": False, "state": {
                "waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}})
            self._stop.wait()
            return
        policy = self.pod["spec"].get("restartPolicy", "Always")
        full_env = dict(self.runner.base_env)
        full_env.pop("KUBECONFIG", None)  # a pod gets its own ServiceAccount's credentials, or none
        full_env.update(env)
        full_env.setdefault("HOSTNAME", self.name)
        while not self._stop.is_set():
            code = self._run_once(argv, full_env, env)
            if self._stop.is_set():
                return
            finished: dict[str, Any] = {"terminated": {
                "exitCode": code, "reason": "Completed" if code == 0 else "Error",
                "startedAt": self._started_at, "finishedAt": podstatus.now()}}
            message = podstatus.termination_message(self.container, code, self.log_path, self._log_offset)
            if message is not None:
                finished["terminated"]["message"] = message
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                self._patch(ready=False, phase="Succeeded" if code == 0 else "Failed",
                            container={"state": finished, "started": False})
                self._stop.wait()
                return
            self.restarts += 1
            delay = self.runner.backoff.delay(self.restarts)
            self._patch(ready=False, container={
                "state": {"waiting": {"reason": "CrashLoopBackOff",
                                      "message": f"back-off {delay:.0f}s restarting failed container"}},
                "lastState": finished, "restartCount": self.restarts, "started": False})
            self._stop.wait(delay)

    def _run_once(self, argv: list[str], full_env: dict[str, str], env: Mapping[str, str]) -> int:
        """Start the process once, probe it until it exits or we stop; return its exit code."""
        self._write_log(f"[pod-runner {podstatus.now()}] start #{self.restarts}: {' '.join(argv)}\n")
        self._log_offset = self.log_path.stat().st_size  # this run's output starts here
        self._started_at = podstatus.now()
        # this thread outlives the process (it stops it), so PDEATHSIG only fires if the runner dies
        self.proc = spawn(self.name, argv, self.log_path, env=full_env, cwd=self.dir, die_with_parent=True)
        self.pids.append(self.proc.pid)
        self.started.set()
        t0 = time.monotonic()
        c = self.container
        cap = self.runner.probe_period_cap
        readiness = ProbeState(c["readinessProbe"], t0, period_cap=cap) if c.get("readinessProbe") else None
        liveness = (ProbeState(c["livenessProbe"], t0, default_success=True, period_cap=cap)
                    if c.get("livenessProbe") else None)
        startup = ProbeState(c["startupProbe"], t0, period_cap=cap) if c.get("startupProbe") else None
        self.ready = readiness is None and startup is None
        self._patch(ready=self.ready, container={
            "state": {"running": {"startedAt": self._started_at}}, "restartCount": self.restarts,
            "started": startup is None})
        pod_ip = self.pod["status"]["podIP"]
        while not self._stop.is_set():
            if not self.proc.alive():
                code = self.proc.popen.returncode
                # a container runtime reports death by signal N as exit code 128 + N (SIGKILL: 137)
                return -1 if code is None else (128 - code if code < 0 else code)
            now = time.monotonic()
            if startup is not None:
                if startup.due(now):
                    ok = startup.record(run_probe(startup.probe, pod_ip, c, full_env, str(self.dir)))
                    if ok:
                        startup = None
                        self._patch(container={"started": True})
                        t = time.monotonic()
                        if readiness is not None:
                            readiness.next_at = t + float(readiness.probe.get("initialDelaySeconds", 0))
                        else:
                            self._set_ready(True)
                        if liveness is not None:
                            liveness.next_at = t + float(liveness.probe.get("initialDelaySeconds", 0))
                    elif startup.failures >= startup.failure_threshold:
                        self._write_log("[pod-runner] startup probe failed; killing\n")
                        self._kill()
                        continue
            else:
                if readiness is not None and readiness.due(now):
                    ok = readiness.record(run_probe(readiness.probe, pod_ip, c, full_env, str(self.dir)))
                    if ok != self.ready:
                        self._set_ready(ok)
                if liveness is not None and liveness.due(now):
                    if not liveness.record(run_probe(liveness.probe, pod_ip, c, full_env, str(self.dir))):
                        self._write_log("[pod-runner] liveness probe failed; killing\n")
                        self._kill()
                        continue
            self._refresh_volumes()
            self._stop.wait(0.1)
        return 0

    def _sync_volumes(self) -> dict[str, str]:
        """Write (or refresh) the container's Secret/ConfigMap volumes; mountPath -> local directory."""
        self._volumes_synced_at = time.monotonic()
        return podvolumes.sync_volumes(self.pod, self.container, self._api(), self.dir / "volumes")

    def _refresh_volumes(self) -> None:
        """Like a kubelet, keep mounted Secrets and ConfigMaps current while the pod runs (every ~1 s here)."""
        if not self._mounts or time.monotonic() - self._volumes_synced_at < VOLUME_SYNC_SECONDS:
            return
        try:
            self._sync_volumes()
        except (podexec.PodSpecError, ApiError) as e:
            self._volumes_synced_at = time.monotonic()
            log.debug("refreshing volumes of %s/%s: %s", self.namespace, self.name, e)

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        self._patch(ready=ready)

    def _grace(self) -> float:
        grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        limit = self.runner.max_grace if self._delete.is_set() else self.runner.stop_grace
        return float(min(grace, limit))

    def _kill(self) -> None:
        proc = self.proc
        if proc is None or not proc.alive():
            if proc is not None:  # leader gone: still reap anything left in its process group
                terminate_pid(proc.pid, timeout=0, group=True, popen=proc.popen)
            return
        grace = self._grace()
        deadline = time.monotonic() + grace
        if self._delete.is_set():
            self._pre_stop(grace)
        terminate_pid(proc.pid, timeout=max(0.0, deadline - time.monotonic()), group=True, popen=proc.popen)
        if self.ready:
            self.ready = False
        self._write_log(f"[pod-runner {podstatus.now()}] stopped (exit {proc.popen.returncode})\n")

    def _pre_stop(self, grace: float) -> None:
        hook = ((self.container.get("lifecycle") or {}).get("preStop")) or {}
        if not hook:
            return
        if "sleep" in hook:
            time.sleep(min(float(hook["sleep"].get("seconds", 0)), grace))
            return
        probe = dict(hook, timeoutSeconds=max(1, int(grace)))
        pod_ip = self.pod.get("status", {}).get("podIP", "")
        run_probe(probe, pod_ip, self.container, self.runner.base_env, str(self.dir))

    def _remove_pod(self) -> None:
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}}
        try:
            self._api().delete(self._path(), body)
        except ApiError as e:
            if e.status != 409:
                log.warning("deleting %s/%s: %s", self.namespace, self.name, e)


class PodRunner:
    """Watches pods (one namespace or all, optionally by label selector) and runs their processes."""

    def __init__(
        self,
        kubeconfig: str | Path,
        workdir: Path | None = None,
        namespace: str | None = None,
        label_selector: str | None = None,
        env: Mapping[str, str] | None = None,
        path_prefix: list[str] | None = None,
        entrypoints: Mapping[str, list[str]] | None = None,
        backoff: Backoff = Backoff(),
        max_grace: float = 60.0,
        stop_grace: float = 10.0,
        probe_period_cap: float | None = None,
    ):
        """Args:
        kubeconfig: admin kubeconfig of the test bed.
        workdir: where each pod gets a directory (cwd + ``<container>.log``); default a temp dir.
        namespace / label_selector: which pods to run (default: all namespaces, all pods).
        env: base environment of every process (default os.environ); container env goes on top.
        path_prefix: directories searched for executables before PATH (default: this venv's bin).
        entrypoints: image base name -> argv for containers without ``command``.
        backoff: CrashLoopBackOff delays.
        max_grace: cap on a deleted pod's termination grace period (seconds).
        stop_grace: grace given to processes when the runner itself stops.
        probe_period_cap: probe at least this often (see ProbeState.period_cap).
        """
        self.kubeconfig = Path(kubeconfig)
        self.client = KubeClient(self.kubeconfig)
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="infergrid-pods-"))
        self.namespace = namespace
        self.label_selector = label_selector
        base = dict(os.environ if env is None else env)
        prefix = path_prefix if path_prefix is not None else podexec.default_path_prefix()
        base["PATH"] = os.pathsep.join([*prefix, base.get("PATH", "")])
        self.base_env = base
        self.search_path = base["PATH"]
        self.entrypoints = dict(entrypoints or {})
        self.backoff = backoff
        self.max_grace = max_grace
        self.stop_grace = stop_grace
        self.probe_period_cap = probe_period_cap
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.pods: dict[str, PodProcess] = {}  # by pod uid
        self.stopping = False
        self._lock = threading.Lock()
        self._fake_nodes: set[str] = set()
        self._synced = threading.Event()
        self._thread = threading.Thread(target=self._watch_loop, name="pod-runner-watch", daemon=True)
        self._watch_error: str | None = None
        self._stream: Any = None

    # -------------------------------------------------------------- public API

    def start(self, timeout: float = 30.0) -> PodRunner:
        """Start watching; returns once the initial pod list was handled."""
        self._thread.start()
        if not self._synced.wait(timeout):
            raise RuntimeError(f"pod runner did not sync within {timeout}s: {self._watch_error}")
        return self

    def stop(self) -> None:
        """Stop watching and stop every process (SIGTERM, then SIGKILL) in parallel."""
        self.stopping = True
        with self._lock:
            pods = list(self.pods.values())
        for p in pods:
            p.stop()
        for p in pods:
            p.join(self.stop_grace + 15)
        self._interrupt_watch()
        self._thread.join(5)
        self.client.close()

    def __enter__(self) -> PodRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def find(self, namespace: str, name: str) -> PodProcess | None:
        """The newest PodProcess for a pod name."""
        with self._lock:
            found = [p for p in self.pods.values() if p.namespace == namespace and p.name == name]
        return found[-1] if found else None

    def wait_started(self, namespace: str, name: str, timeout: float = 60.0) -> PodProcess:
        """Wait until the pod's process has been started (raises TimeoutError with the reason)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.find(namespace, name)
            if p is not None and p.started.wait(0.1):
                return p
            if p is not None and p.error:
                raise RuntimeError(f"pod {namespace}/{name}: {p.error}")
            time.sleep(0.1)
        raise TimeoutError(f"no process started for pod {namespace}/{name} within {timeout}s")

    def all_pids(self) -> list[int]:
        """Every pid this runner ever started (for checks that all are gone)."""
        with self._lock:
            return [pid for p in self.pods.values() for pid in p.pids]

    def log_path(self, namespace: str, name: str) -> Path | None:
        """The log file of a pod's container."""
        p = self.find(namespace, name)
        return p.log_path if p else None

    # -------------------------------------------------------------- watching

    def _pods_path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods" if self.namespace else "/api/v1/pods"

    def _params(self) -> dict[str, str]:
        return {"labelSelector": self.label_selector} if self.label_selector else {}

    def _refresh_nodes(self) -> None:
        nodes = (self.client.get("/api/v1/nodes") or {}).get("items", [])
        self._fake_nodes = {
            n["metadata"]["name"] for n in nodes
            if (n["metadata"].get("annotations") or {}).get(FAKE_NODE_ANNOTATION) == "fake"
        }

    def _set_stream(self, response: Any) -> None:
        stream = response.extensions.get("network_stream")
        self._stream = stream.get_extra_info("socket") if stream is not None else None
        if self.stopping:
            self._interrupt_watch()

    def _interrupt_watch(self) -> None:
        """Shut the watch socket down so the blocked read in the watch thread returns at once."""
        sock = self._stream
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _watch_loop(self) -> None:
        while not self.stopping:
            try:
                self._refresh_nodes()
                listing = self.client.get(self._pods_path(), **self._params()) or {}
                rv = listing["metadata"]["resourceVersion"]
                live = set()
                for pod in listing.get("items", []):
                    live.add(pod["metadata"]["uid"])
                    self._handle("MODIFIED", pod)
                with self._lock:
                    gone = [p for uid, p in self.pods.items() if uid not in live and not p.finished.is_set()]
                for p in gone:
                    p.stop()
                self._synced.set()
                while not self.stopping:
                    events = self.client.watch(self._pods_path(), rv, timeout_seconds=30,
                                               on_open=self._set_stream, **self._params())
                    for ev in events:
                        if self.stopping:
                            return
                        if ev["type"] == "ERROR":
                            raise ApiError(ev["object"].get("code", 500), str(ev["object"]), "WATCH", "pods")
                        rv = ev["object"]["metadata"].get("resourceVersion", rv)
                        if ev["type"] != "BOOKMARK":
                            self._handle(ev["type"], ev["object"])
            except Exception as e:  # noqa: BLE001 - relist after any watch failure
                self._watch_error = f"{type(e).__name__}: {e}"
                if not self.stopping:
                    log.debug("pod watch restarting: %s", self._watch_error)
                    time.sleep(0.5)

    def _handle(self, kind: str, pod: dict[str, Any]) -> None:
        if self.stopping:
            return
        meta, status = pod["metadata"], pod.get("status", {})
        uid = meta["uid"]
        with self._lock:
            proc = self.pods.get(uid)
        if kind == "DELETED":
            if proc is not None:
                proc.update(pod)
                proc.delete()
            return
        if proc is not None:
            proc.update(pod)
            if meta.get("deletionTimestamp"):
                proc.delete()
            return
        if meta.get("deletionTimestamp") or status.get("phase") != "Running" or not status.get("podIP"):
            return
        node = pod["spec"].get("nodeName")
        if node not in self._fake_nodes:
            self._refresh_nodes()
            if node not in self._fake_nodes:
                return
        proc = PodProcess(self, pod)
        with self._lock:
            self.pods[uid] = proc
        proc.start()


def main(argv: list[str] | None = None) -> int:
    """`python -m infergrid.testbed.podrunner --kubeconfig K [--namespace NS] [--selector S] [--workdir D]`."""
    ap = argparse.ArgumentParser(prog="infergrid.testbed.podrunner", description=__doc__.split("\n")[0])
    ap.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), required="KUBECONFIG" not in os.environ)
    ap.add_argument("--namespace")
    ap.add_argument("--selector")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--probe-period-cap", type=float, default=None,
                    help="probe at most this many seconds apart (failure budgets keep their length)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from infergrid.testbed.netns import in_pod_netns

    if not in_pod_netns():
        print("pod runner: not inside a pod network namespace (use `cli exec` or `cli nsexec`)", file=sys.stderr)
        return 2
    runner = PodRunner(args.kubeconfig, workdir=args.workdir, namespace=args.namespace,
                       label_selector=args.selector, probe_period_cap=args.probe_period_cap)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    runner.start()
    log.info("pod runner %s watching %s (workdir %s)", runner.id, runner._pods_path(), runner.workdir)
    done.wait()
    runner.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

