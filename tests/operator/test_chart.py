"""The Helm chart: documented values, schema, and a least-privilege ClusterRole."""

import json
import os
import subprocess
import time

import jsonschema_rs
import pytest
import yaml
from operator_helpers import CHART

from infergrid.testbed import paths

VALUES = CHART / "values.yaml"


def helm(*args: str) -> str:
    binary = paths.bin_dir() / "helm"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"helm is missing from {binary.parent}: run `make testbed-build`", pytrace=False)
    return subprocess.run([str(binary), *args], capture_output=True, text=True, check=True).stdout


def rendered(*sets: str) -> list[dict]:
    flags = [arg for s in sets for arg in ("--set", s)]
    text = helm("template", "rel", str(CHART), "--namespace", "infergrid-system", *flags)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def test_every_values_key_has_a_comment_above_it():
    lines = VALUES.read_text().splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped or stripped.startswith("-"):
            continue
        previous = lines[number - 1].strip()
        assert previous.startswith("#"), f"values.yaml line {number + 1} ({stripped!r}) has no comment"


def test_values_match_their_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load(VALUES.read_text())
    jsonschema_rs.validate(schema, values)
    with pytest.raises(jsonschema_rs.ValidationError):
        jsonschema_rs.validate(schema, {**values, "operator": {**values["operator"], "replicas": -1}})
    with pytest.raises(jsonschema_rs.ValidationError):
        jsonschema_rs.validate(schema, {**values, "typo": 1})


def test_values_schema_allows_global_for_use_as_a_subchart():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load(VALUES.read_text())
    jsonschema_rs.validate(schema, {**values, "global": {"imageRegistry": "registry.example", "x": [1]}})


@pytest.mark.controlplane
def test_peering_objects_are_named_after_the_release():
    """Two releases in two namespaces must not share the cluster-scoped peering object."""
    names = set()
    for release in ("team-a", "team-b"):
        docs = [d for d in yaml.safe_load_all(helm("template", release, str(CHART), "--namespace", release)) if d]
        (peering,) = [d for d in docs if d["kind"] == "ClusterKopfPeering"]
        (ctr,) = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"]
        assert f"--peering={peering['metadata']['name']}" in ctr["args"]
        names.add(peering["metadata"]["name"])
    assert names == {"team-a-infergrid", "team-b-infergrid"}
    # Namespaced operators peer through a KopfPeering in each watched namespace (globs: none can be made).
    docs = rendered("operator.watchNamespaces={team-a,team-*}")
    assert [(d["kind"], d["metadata"]["namespace"]) for d in docs if "Peering" in d["kind"]] == [
        ("KopfPeering", "team-a")]


@pytest.mark.controlplane
def test_every_image_comes_from_values_and_the_version_is_one():
    docs = rendered("operator.image.repository=reg.example/op", "worker.image.repository=reg.example/wk")
    text = yaml.safe_dump_all(docs)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert text.count("image:") == 1 and "image: reg.example/op:" + chart["appVersion"] in text
    assert f"reg.example/wk:{chart['appVersion']}" in text  # the operator's default worker image
    from infergrid.operator.config import OperatorConfig
    assert OperatorConfig().worker_image.endswith(":" + chart["appVersion"])
    for pyproject in ("operator", "worker"):
        assert f'version = "{chart["appVersion"]}"' in (CHART.parents[1] / pyproject / "pyproject.toml").read_text()


@pytest.mark.controlplane  # needs the test bed's helm binary
def test_helm_lint_and_render():
    helm("lint", str(CHART), "--strict")
    kinds = sorted(doc["kind"] for doc in rendered())
    num_dashboards = len(list((CHART / "dashboards").glob("*.json")))
    assert kinds == ["ClusterKopfPeering", "ClusterRole", "ClusterRoleBinding", *["ConfigMap"] * num_dashboards,
                     "Deployment", "Service", "ServiceAccount"]


@pytest.mark.controlplane
def test_cluster_role_is_least_privilege():
    role = next(doc for doc in rendered() if doc["kind"] == "ClusterRole")
    for rule in role["rules"]:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
        assert "secrets" not in rule["resources"]
        assert not set(rule["verbs"]) & {"deletecollection", "escalate", "bind", "impersonate"}, rule
    granted = {(group, res): set(rule["verbs"]) for rule in role["rules"]
               for group in rule["apiGroups"] for res in rule["resources"]}
    # The one delete: the health monitor replaces a wedged worker pod (its Deployment makes a new one).
    assert [key for key, verbs in granted.items() if "delete" in verbs] == [("", "pods")]
    assert granted[("", "pods")] == {"get", "list", "watch", "delete"}
    assert granted[("infergrid.dev", "inferenceservices/scale")] == {"get", "patch"}
    assert ("", "namespaces") not in granted  # only when watchNamespaces is set
    scoped = next(doc for doc in rendered("operator.watchNamespaces={team-a}") if doc["kind"] == "ClusterRole")
    assert any("namespaces" in rule["resources"] for rule in scoped["rules"])


@pytest.mark.controlplane
def test_operator_deployment_wiring():
    docs = rendered("operator.watchNamespaces={team-a}", "worker.image.tag=9.9")
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    assert ctr["command"] == ["infergrid-operator"]
    assert "--peering=rel-infergrid" in ctr["args"] and "--namespace=team-a" in ctr["args"]
    assert not any(arg.startswith("--priority") for arg in ctr["args"])  # replicas must not tie
    env = {e["name"]: e for e in ctr["env"]}
    assert env["INFERGRID_WORKER_IMAGE"]["value"] == "ghcr.io/infergrid/worker:9.9"
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert json.loads(env["INFERGRID_PROMETHEUS_POD_LABELS"]["value"]) == {"app.kubernetes.io/name": "prometheus"}
    # the worker NetworkPolicy admits exactly these pods: they must be the operator pods' own labels
    operator_labels = json.loads(env["INFERGRID_OPERATOR_POD_LABELS"]["value"])
    assert operator_labels == deployment["spec"]["selector"]["matchLabels"]
    assert operator_labels.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert env["INFERGRID_ROUTER_IMAGE"]["value"].startswith("ghcr.io/infergrid/operator:")
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["serviceAccountName"] == "rel-infergrid"
    binding = next(doc for doc in docs if doc["kind"] == "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rel-infergrid",
                                    "namespace": "infergrid-system"}]


def test_chart_installs_with_helm_into_a_restricted_namespace(control_plane, k8s_namespace):
    """`helm install` against the real API server; the operator pod passes PodSecurity "restricted"."""
    cp, ns = control_plane, k8s_namespace
    cp.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    release = "helm-" + ns[-6:]
    helm("install", release, str(CHART), "--namespace", ns, "--kubeconfig", str(cp.kubeconfig),
         "--set", f"peering.name={release}", "--set", "operator.replicas=1", "--wait=false")
    try:
        def operator_pods():
            listing = cp.client.get(f"/api/v1/namespaces/{ns}/pods",
                                    labelSelector="app.kubernetes.io/component=operator")
            return listing["items"]
        deadline = time.monotonic() + 30
        while not operator_pods() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert operator_pods(), cp.kubectl("get", "events", "-n", ns).stdout
        assert cp.client.get(f"/apis/kopf.dev/v1/clusterkopfpeerings/{release}") is not None
    finally:
        helm("uninstall", release, "--namespace", ns, "--kubeconfig", str(cp.kubeconfig))


@pytest.mark.controlplane
def test_dashboards_are_configmaps_for_the_grafana_sidecar():
    files = {p.name: p.read_text() for p in (CHART / "dashboards").glob("*.json")}
    maps = [doc for doc in rendered() if doc["kind"] == "ConfigMap"]
    assert {name for doc in maps for name in doc["data"]} == set(files)
    for doc in maps:
        assert doc["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, text),) = doc["data"].items()
        assert json.loads(text) == json.loads(files[name])  # the JSON arrives intact
    custom = rendered("dashboards.label=my_dash", "dashboards.labelValue=yes", "dashboards.namespace=monitoring",
                      "dashboards.annotations.grafana_folder=infergrid")
    for doc in (d for d in custom if d["kind"] == "ConfigMap"):
        assert doc["metadata"]["labels"]["my_dash"] == "yes" and "grafana_dashboard" not in doc["metadata"]["labels"]
        assert doc["metadata"]["namespace"] == "monitoring"
        assert doc["metadata"]["annotations"] == {"grafana_folder": "infergrid"}
    assert not [d for d in rendered("dashboards.enabled=false") if d["kind"] == "ConfigMap"]


@pytest.mark.controlplane
def test_prometheus_rule_is_the_rules_file_verbatim():
    assert not [d for d in rendered() if d["kind"] == "PrometheusRule"]  # off by default
    (rule,) = [d for d in rendered("prometheusRule.enabled=true", "prometheusRule.labels.release=kps")
               if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"] == yaml.safe_load((CHART / "rules" / "infergrid.rules.yaml").read_text())


@pytest.mark.controlplane
def test_operator_service_monitor_keeps_the_operators_labels_and_names_the_job():
    (monitor,) = [d for d in rendered("metrics.serviceMonitor.enabled=true") if d["kind"] == "ServiceMonitor"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["honorLabels"] is True and endpoint["port"] == "metrics"
    assert endpoint["relabelings"] == [{"targetLabel": "job", "replacement": "infergrid-operator"}]
