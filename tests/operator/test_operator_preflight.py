"""`infergrid-operator` on a cluster that lacks what it needs says so and exits non-zero (kopf alone
would log in and idle in silence). A cluster without any CRD at all: tests/images (a fresh test bed)."""

import subprocess
import sys

from operator_cluster import RELEASE_NAMESPACE


def run_operator(kubeconfig, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "infergrid.operator.main", "--bind", "127.0.0.1", "--metrics-port", "0",
            "--health-port", "0", "--kubeconfig", str(kubeconfig), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_a_missing_cluster_peering_object_is_named_and_fatal(operator_kubeconfig):
    result = run_operator(operator_kubeconfig, "--peering", "no-such-peering")
    assert result.returncode == 2, result.stderr
    assert "ClusterKopfPeering 'no-such-peering' does not exist" in result.stderr
    assert "--standalone" in result.stderr


def test_namespaced_operators_need_a_kopf_peering_in_each_namespace(operator_kubeconfig, k8s_namespace):
    result = run_operator(operator_kubeconfig, "--peering", "rel-infergrid", "--namespace", k8s_namespace,
                          "--namespace", "team-*")
    assert result.returncode == 2, result.stderr
    assert f"KopfPeering 'rel-infergrid' in namespace {k8s_namespace} does not exist" in result.stderr
    assert "team-*" not in result.stderr  # glob patterns cannot be looked up


def test_an_unreachable_api_server_is_named_and_fatal(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}}]\n"
        "users: [{name: u, user: {token: x}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\n")
    result = run_operator(kubeconfig, "--standalone")
    assert result.returncode == 2, result.stderr
    assert "cannot reach the API server at https://127.0.0.1:1" in result.stderr


def test_standalone_needs_no_peering_and_warns(operator_kubeconfig):
    """With the CRDs present and --standalone, the checks pass: the operator starts (killed after 'warns')."""
    argv = [sys.executable, "-m", "infergrid.operator.main", "--bind", "127.0.0.1", "--metrics-port", "0",
            "--health-port", "0", "--kubeconfig", str(operator_kubeconfig), "--standalone", "--namespace",
            RELEASE_NAMESPACE]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "running standalone" in line:
                break
        assert any("running standalone (--standalone): start only one replica" in line for line in seen), seen
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
