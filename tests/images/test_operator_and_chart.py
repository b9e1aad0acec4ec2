"""The operator image against a real API server (the test bed's, reached from the host through its
forwarder), installed the way a cluster admin installs it: `helm install` with the images' names.

The operator container runs with the container spec (args, env) of the chart's Deployment, on the
host network; worker pods are run by the test bed's pod runner from this checkout (KWOK nodes have no
container runtime), so the completion comes from a real worker process at its pod IP.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import pytest
import yaml
from image_helpers import CHART, REPO, docker, host_kubeconfig, is_semver, labels_of, user_of

from infergrid.testbed.procs import free_port

pytestmark = pytest.mark.images

READY_TIMEOUT = 240  # operator start + a worker process importing torch and loading the tiny model
RELEASES = (("first", "infergrid-a"), ("second", "infergrid-b"))


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}", pytrace=False)


def operator_container_args(bed, release: str, namespace: str, kubeconfig) -> list[str]:
    """`docker run` arguments that run the chart's operator container spec on the host network."""
    manifest = bed.helm("get", "manifest", release, "--namespace", namespace).stdout
    deployment = next(doc for doc in yaml.safe_load_all(manifest)
                      if doc and doc["kind"] == "Deployment" and doc["metadata"]["name"].endswith("-operator"))
    (ctr,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {"KUBECONFIG": "/etc/infergrid/kubeconfig", "INFERGRID_BIND": "127.0.0.1", "POD_ID": f"{release}-0"}
    env.update({e["name"]: e["value"] for e in ctr.get("env", []) if "value" in e})
    flags = ["--network", "host", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
             "--security-opt", "no-new-privileges", "-v", f"{kubeconfig}:/etc/infergrid/kubeconfig:ro"]
    for key, value in env.items():
        flags += ["-e", f"{key}={value}"]
    # NOTE: --entrypoint and the image come from the chart's container: the chart names the image.
    return [*flags, "--entrypoint", ctr["command"][0], ctr["image"], *ctr["args"]]


def isvc(bed, namespace: str, name: str) -> dict[str, Any]:
    out = bed.kubectl("get", f"inferenceservices.infergrid.dev/{name}", "-n", namespace, "-o", "json",
                      check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def leftovers(bed, release: str) -> list[str]:
    """Objects of a release still in the cluster (namespaced ones anywhere, and cluster-scoped ones)."""
    selector = f"app.kubernetes.io/instance={release}"
    kinds = "deployments,services,serviceaccounts,configmaps,clusterroles,clusterrolebindings," \
            "clusterkopfpeerings.kopf.dev,kopfpeerings.kopf.dev"
    out = bed.kubectl("get", kinds, "-A", "-l", selector, "-o", "name").stdout
    return out.split()


def test_operator_image_metadata(images):
    labels = labels_of(images.operator)
    assert labels["org.opencontainers.image.version"] == images.version and is_semver(images.version)
    assert labels["org.opencontainers.image.revision"] not in ("", "unknown")
    assert user_of(images.operator) == "65532:65532"  # the chart's operator securityContext
    # No shell at run time, and no torch (the router and operator image stays small).
    assert docker("run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", images.operator, "-c", "true",
                  check=False).returncode != 0
    probe = docker("run", "--rm", "--network", "none", "--read-only", "--entrypoint", "python3", images.operator,
                   "-c", "import importlib.util as u; print(u.find_spec('torch') is None, u.find_spec('kopf') is not None)")
    assert probe.stdout.split() == ["True", "True"]


def test_operator_image_on_a_bare_cluster_says_what_is_missing(images, testbed, tmp_path):
    """Run first: the session's test bed has no CRDs yet. kopf alone would log in and idle in silence."""
    kubeconfig = host_kubeconfig(testbed, tmp_path)
    result = docker("run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp",
                    "-v", f"{kubeconfig}:/etc/infergrid/kubeconfig:ro", "-e", "KUBECONFIG=/etc/infergrid/kubeconfig",
                    images.operator, "--bind=127.0.0.1", "--metrics-port=0", "--health-port=0", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "InferenceService CRD (inferenceservices.infergrid.dev) is not installed" in result.stderr
    assert "ClusterKopfPeering CRD (clusterkopfpeerings.kopf.dev) is not installed" in result.stderr


def test_helm_install_serve_second_release_upgrade_uninstall(images, testbed, tiny_model, containers, tmp_path):
    bed, kubeconfig = testbed, host_kubeconfig(testbed, tmp_path)
    image_values = ["--set", f"operator.image.repository={images.operator_repository}",
                    "--set", f"worker.image.repository={images.worker_repository}",
                    "--set", "operator.replicas=1"]
    installed = []
    try:
        # 1. The first release, its operator (the image) and an example InferenceService -> Ready.
        release, namespace = RELEASES[0]
        notes = bed.helm("install", release, str(CHART), "--namespace", namespace, "--create-namespace",
                         *image_values, "--set", f"operator.metricsPort={free_port()}",
                         "--set", f"operator.healthPort={free_port()}").stdout
        installed.append(RELEASES[0])
        # NOTES: the next two commands, with a model that needs no token.
        assert "hf://Qwen/Qwen2.5-0.5B-Instruct" in notes and "tokenSecretRef" not in notes, notes
        assert "kubectl wait --for=condition=Ready inferenceservices.infergrid.dev/qwen" in notes, notes
        run_args = operator_container_args(bed, release, namespace, kubeconfig)
        assert images.operator in run_args
        containers(*run_args)

        doc = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
        doc["spec"]["model"]["source"] = f"file://{tiny_model}"
        bed.kubectl("create", "namespace", "team-a")
        bed.kubectl("apply", "-n", "team-a", "-f", "-", input=json.dumps(doc))
        ready = wait_for(lambda: condition(isvc(bed, "team-a", "tiny"), "Ready").get("status") == "True"
                         and isvc(bed, "team-a", "tiny"), READY_TIMEOUT, "InferenceService team-a/tiny Ready")
        worker = json.loads(bed.kubectl("get", "pods", "-n", "team-a", "-l", ready["status"]["selector"],
                                        "-o", "json").stdout)["items"][0]
        assert worker["spec"]["containers"][0]["image"] == images.worker  # the chart's worker image
        # 2. A completion through the endpoint: today the worker pod's IP (the router is not built yet).
        script = ("import openai, sys; c = openai.OpenAI(base_url=sys.argv[1], api_key='x', timeout=60)"
                  ".completions.create(model='tiny', prompt='Hello', max_tokens=4, extra_body={'ignore_eos': True});"
                  " print(c.usage.completion_tokens)")
        answer = bed.nsexec(sys.executable, "-c", script, f"http://{worker['status']['podIP']}:8000/v1")
        assert answer.stdout.strip() == "4", answer.stderr

        # 3. A second release in another namespace installs beside the first.
        release_b, namespace_b = RELEASES[1]
        bed.helm("install", release_b, str(CHART), "--namespace", namespace_b, "--create-namespace", *image_values)
        installed.append(RELEASES[1])
        peerings = bed.kubectl("get", "clusterkopfpeerings.kopf.dev", "-o", "name").stdout.split()
        assert sorted(peerings) == [f"clusterkopfpeering.kopf.dev/{r}-infergrid" for r, _ in RELEASES]

        # 4. helm upgrade changes the operator's container; the service stays Ready.
        bed.helm("upgrade", release, str(CHART), "--namespace", namespace, "--reuse-values",
                 "--set", "operator.verbose=true")
        args = json.loads(bed.kubectl("get", "deployment", f"{release}-infergrid-operator", "-n", namespace,
                                      "-o", "json").stdout)["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--verbose" in args
        assert condition(isvc(bed, "team-a", "tiny"), "Ready").get("status") == "True"
    finally:
        bed.kubectl("delete", "namespace", "team-a", "--wait=false", check=False)
        for release, namespace in installed:
            bed.helm("uninstall", release, "--namespace", namespace, "--wait", check=False)

    # 5. helm uninstall leaves nothing of either release behind (the CRDs stay: Helm never deletes crds/).
    for release, _ in RELEASES:
        assert leftovers(bed, release) == [], release
    assert bed.kubectl("get", "crd", "inferenceservices.infergrid.dev", "-o", "name").stdout.strip()
