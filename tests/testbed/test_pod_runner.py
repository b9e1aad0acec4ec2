"""The pod runner: pods on fake nodes become local processes answering on their pod IPs."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from infergrid.testbed.controlplane import ControlPlane
from infergrid.testbed.podrunner import PodRunner
from infergrid.testbed.procs import pid_alive
from infergrid.testbed.waiting import wait_for

pytestmark = pytest.mark.controlplane



def http_pod(name: str, probe: bool = True, **extra: object) -> str:
    container = {
        "name": "web",
        "image": "python:3.11",
        "command": ["python", "-m", "http.server"],
        "args": ["--bind", "$(POD_IP)", "$(PORT)"],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "PORT", "value": "8000"},
        ],
        "ports": [{"name": "http", "containerPort": 8000}],
    }
    if probe:
        container["readinessProbe"] = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}
    container.update(extra)
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                       "spec": {"terminationGracePeriodSeconds": 5, "containers": [container]}})


def get_pod(cp: ControlPlane, ns: str, name: str) -> dict | None:
    return cp.client.get(f"/api/v1/namespaces/{ns}/pods/{name}", ok_missing=True)


def condition(pod: dict, ctype: str) -> str | None:
    return next((c["status"] for c in pod["status"].get("conditions", []) if c["type"] == ctype), None)


def test_pod_process_serves_on_pod_ip_and_stops_on_delete(
    control_plane: ControlPlane, k8s_namespace: str, pod_runner: PodRunner
) -> None:
    ns = k8s_namespace
    control_plane.kubectl("-n", ns, "apply", "-f", "-", input=http_pod("web"))
    proc = pod_runner.wait_started(ns, "web")
    # readiness is the runner's job: False until the httpGet probe passes, then True
    pod = wait_for(lambda: (p := get_pod(control_plane, ns, "web")) and condition(p, "Ready") == "True" and p,
                   what="pod Ready")
    ip = pod["status"]["podIP"]
    assert ip.startswith("10.244.")
    assert pod["status"]["containerStatuses"][0]["ready"] is True
    r = httpx.get(f"http://{ip}:8000/", timeout=5)
    assert r.status_code == 200
    assert pod["metadata"]["annotations"]["testbed.infergrid.dev/pod-runner"] == pod_runner.id

    pid = proc.pid
    assert pid is not None and pid_alive(pid)
    control_plane.kubectl("-n", ns, "delete", "pod", "web", "--wait=true", "--timeout=30s")
    assert not pid_alive(pid)
    assert get_pod(control_plane, ns, "web") is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{ip}:8000/", timeout=2)
    assert "GET / HTTP/1.1" in proc.log_path.read_text()


def test_readiness_follows_the_probe(control_plane: ControlPlane, k8s_namespace: str, pod_runner: PodRunner) -> None:
    ns = k8s_namespace
    # the probe asks for a file the server only has once the test creates it
    control_plane.kubectl("-n", ns, "apply", "-f", "-", input=http_pod(
        "gate", readinessProbe={"httpGet": {"path": "/ready.txt", "port": 8000}, "periodSeconds": 1,
                                "failureThreshold": 1}))
    proc = pod_runner.wait_started(ns, "gate")
    time.sleep(2.5)
    assert condition(get_pod(control_plane, ns, "gate"), "Ready") == "False"
    (proc.dir / "ready.txt").write_text("ok")
    wait_for(lambda: condition(get_pod(control_plane, ns, "gate"), "Ready") == "True", what="Ready after the file")
    (proc.dir / "ready.txt").unlink()
    wait_for(lambda: condition(get_pod(control_plane, ns, "gate"), "Ready") == "False", what="unready again")


def test_crashing_container_is_restarted_with_backoff(
    control_plane: ControlPlane, k8s_namespace: str, pod_runner: PodRunner
) -> None:
    ns = k8s_namespace
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "crash"},
           "spec": {"containers": [{"name": "c", "image": "python",
                                    "command": ["python", "-c", "import sys; print('boom'); sys.exit(3)"]}]}}
    control_plane.kubectl("-n", ns, "apply", "-f", "-", input=json.dumps(pod))
    status = wait_for(
        lambda: (p := get_pod(control_plane, ns, "crash")) and (s := p["status"].get("containerStatuses", [{}])[0])
        and s.get("restartCount", 0) >= 2 and s,
        what="two restarts")
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert len(pod_runner.find(ns, "crash").pids) >= 2
    assert pod_runner.find(ns, "crash").log_path.read_text().count("boom") >= 2


def test_fallback_to_logs_on_error_puts_the_log_tail_in_the_termination_message(
    control_plane: ControlPlane, k8s_namespace: str, pod_runner: PodRunner
) -> None:
    ns = k8s_namespace
    script = ("import sys\n"
              "for i in range(200): print(f'noise {i}', flush=True)\n"
              "print('app: error: bad setting', file=sys.stderr)\n"
              "sys.exit(2)\n")
    pods = {"told": "FallbackToLogsOnError", "silent": "File"}
    for name, policy in pods.items():
        control_plane.kubectl("-n", ns, "apply", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "python", "command": ["python", "-c", script],
                                     "terminationMessagePolicy": policy}]}}))
    for name, policy in pods.items():
        status = wait_for(
            lambda n=name: (p := get_pod(control_plane, ns, n)) and (s := p["status"].get("containerStatuses", [{}])[0])
            and s.get("restartCount", 0) >= 1 and s, what=f"{name} restarted")
        last = status["lastState"]["terminated"]
        assert last["exitCode"] == 2 and last["reason"] == "Error" and last["startedAt"] <= last["finishedAt"]
        assert len(status["state"]) == 1, status["state"]  # waiting or running, never both
        if policy == "File":
            assert "message" not in last
            continue
        message = last["message"]
        lines = message.splitlines()
        assert lines[-1] == "app: error: bad setting"
        assert len(lines) == 80 and lines[0] == "noise 121"  # the last 80 lines of this run only
        assert len(message.encode()) <= 2048
        assert "[pod-runner" not in message

def test_all_processes_are_gone_after_the_runner_stops(
    control_plane: ControlPlane, k8s_namespace: str, make_pod_runner
) -> None:
    ns = k8s_namespace
    runner = make_pod_runner(namespace=ns)
    control_plane.kubectl("-n", ns, "apply", "-f", "-", input=json.dumps({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": json.loads(http_pod("x"))["spec"]}}}))
    wait_for(lambda: len([p for p in runner.pods.values() if p.ready]) == 3, what="3 ready processes")
    pods = json.loads(control_plane.kubectl("-n", ns, "get", "pods", "-o", "json").stdout)["items"]
    ips = sorted(p["status"]["podIP"] for p in pods)
    assert len(set(ips)) == 3
    for ip in ips:
        assert httpx.get(f"http://{ip}:8000/", timeout=5).status_code == 200
    pids = runner.all_pids()
    assert len(pids) == 3 and all(pid_alive(p) for p in pids)
    runner.stop()
    assert not [p for p in pids if pid_alive(p)]


def test_secret_volume_is_mounted_and_refreshed_and_the_pod_gets_its_own_account(
    control_plane: ControlPlane, k8s_namespace: str, pod_runner: PodRunner
) -> None:
    """A Secret volume appears at its mountPath (as the process sees paths) and follows Secret updates;
    the process's KUBECONFIG holds a token of its ServiceAccount, with exactly that account's RBAC rights."""
    ns = k8s_namespace
    control_plane.kubectl("-n", ns, "create", "secret", "generic", "keys", "--from-literal=k=first")
    control_plane.kubectl("-n", ns, "create", "serviceaccount", "reader")
    control_plane.kubectl("-n", ns, "create", "role", "reader", "--verb=list", "--resource=endpointslices")
    control_plane.kubectl("-n", ns, "create", "rolebinding", "reader", "--role=reader", f"--serviceaccount={ns}:reader")
    pod = json.loads(http_pod("files", args=["--bind", "$(POD_IP)", "--directory", "/etc/keys", "8000"],
                              volumeMounts=[{"name": "keys", "mountPath": "/etc/keys", "readOnly": True}]))
    pod["spec"]["serviceAccountName"] = "reader"
    pod["spec"]["volumes"] = [{"name": "keys", "secret": {"secretName": "keys"}}]
    control_plane.kubectl("-n", ns, "apply", "-f", "-", input=json.dumps(pod))
    proc = pod_runner.wait_started(ns, "files")
    ip = wait_for(lambda: (p := get_pod(control_plane, ns, "files")) and condition(p, "Ready") == "True"
                  and p["status"]["podIP"], what="pod Ready")
    assert httpx.get(f"http://{ip}:8000/k", timeout=5).text == "first"

    patch = json.dumps({"stringData": {"k": "second"}})
    control_plane.kubectl("-n", ns, "patch", "secret", "keys", "-p", patch)
    wait_for(lambda: httpx.get(f"http://{ip}:8000/k", timeout=5).text == "second", timeout=15,
             what="the rotated Secret inside the running pod")
    assert proc.pid is not None and pid_alive(proc.pid)  # no restart needed

    kubeconfig = proc.dir / "kubeconfig"
    as_pod = ["--kubeconfig", str(kubeconfig), "-n", ns]
    assert control_plane.kubectl(*as_pod, "get", "endpointslices", check=False).returncode == 0
    denied = control_plane.kubectl(*as_pod, "get", "secrets", check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()


def test_pod_without_service_account_token_gets_no_credentials(
    control_plane: ControlPlane, k8s_namespace: str, pod_runner: PodRunner
) -> None:
    ns = k8s_namespace
    pod = json.loads(http_pod("nocreds", probe=False))
    pod["spec"]["automountServiceAccountToken"] = False
    pod["spec"]["containers"][0]["command"] = ["sh", "-c", 'echo "KUBECONFIG=[$KUBECONFIG]"; sleep 30']
    pod["spec"]["containers"][0]["args"] = []
    control_plane.kubectl("-n", ns, "apply", "-f", "-", input=json.dumps(pod))
    proc = pod_runner.wait_started(ns, "nocreds")
    wait_for(lambda: "KUBECONFIG=" in proc.log_path.read_text(), what="the pod's output")
    assert "KUBECONFIG=[]" in proc.log_path.read_text()
    assert not (proc.dir / "kubeconfig").exists()


def test_service_cluster_ip_reaches_ready_pods_through_kube_proxy(
    control_plane: ControlPlane, k8s_namespace: str, pod_runner: PodRunner
) -> None:
    """kube-proxy (nftables) runs in the pod netns: a ClusterIP spreads connections over the ready pods."""
    ns = k8s_namespace
    for name in ("web-a", "web-b"):
        pod = json.loads(http_pod(name))
        pod["metadata"]["labels"] = {"app": "web"}
        control_plane.kubectl("-n", ns, "apply", "-f", "-", input=json.dumps(pod))
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}}
    control_plane.kubectl("-n", ns, "apply", "-f", "-", input=json.dumps(service))
    cluster_ip = control_plane.client.get(f"/api/v1/namespaces/{ns}/services/web")["spec"]["clusterIP"]
    assert cluster_ip.startswith("10.96.")
    for name in ("web-a", "web-b"):
        wait_for(lambda n=name: (p := get_pod(control_plane, ns, n)) and condition(p, "Ready") == "True",
                 what=f"{name} Ready")

    def answered_by() -> set[str]:
        seen = set()
        for _ in range(30):
            with httpx.Client(trust_env=False, timeout=5) as http:  # a new connection each time
                http.get(f"http://{cluster_ip}/?via=service").raise_for_status()
            # (the readiness probes GET "/" without the query)
            seen |= {n for n in ("web-a", "web-b") if "GET /?via=service" in pod_runner.find(ns, n).log_path.read_text()}
        return seen

    assert wait_for(lambda: answered_by() == {"web-a", "web-b"}, timeout=30, what="both pods behind the ClusterIP")
