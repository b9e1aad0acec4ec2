"""The alert rules: promtool checks and unit-tests them (every alert has a test), every alert points to
a runbook section that exists, and the test bed's Prometheus config is one promtool accepts."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from infergrid.testbed.prometheus import (
    find_binary,
    pod_scrape_job,
    pod_targets,
    prometheus_config,
    static_scrape_job,
)

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "charts" / "infergrid" / "rules" / "infergrid.rules.yaml"
RULE_TESTS = Path(__file__).with_name("alerts.test.yaml")
RUNBOOK = REPO / "docs" / "runbook.md"
ISSUE_ALERTS = {  # what the alerting must cover, and the alert that does
    "no ready workers": "InferGridNoReadyWorkers", "TTFT p95 over the SLO": "InferGridTTFTOverSLO",
    "KV cache saturated": "InferGridKVCacheSaturated", "preemption storm": "InferGridPreemptionStorm",
    "queue growing": "InferGridQueueGrowing", "worker stalled": "InferGridWorkerStalled",
    "operator down": "InferGridOperatorDown", "failing reconciles": "InferGridReconcileErrors",
    "router ejecting": "InferGridRouterEjecting",
}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([find_binary("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_checks_the_rules() -> None:
    res = promtool("check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in res.stdout


def test_promtool_unit_tests_pass_and_cover_every_alert() -> None:
    res = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert res.returncode == 0, res.stdout + res.stderr
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case["exp_alerts"]}
    quiet = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if not case["exp_alerts"]}
    names = {a["alert"] for a in alerts()}
    assert names == firing, f"alerts without a firing test: {names - firing}"
    assert names == quiet, f"alerts without a not-firing case: {names - quiet}"


def test_the_issues_alerts_all_exist() -> None:
    assert set(ISSUE_ALERTS.values()) == {a["alert"] for a in alerts()}


def test_every_alert_has_a_severity_and_a_runbook_section_that_exists() -> None:
    text = RUNBOOK.read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for alert in alerts():
        assert alert["labels"]["severity"] in ("critical", "warning"), alert["alert"]
        runbook = alert["annotations"]["runbook"]
        path, _, anchor = runbook.partition("#")
        assert path == "docs/runbook.md" and anchor in anchors, f"{alert['alert']}: no section #{anchor}"
        assert alert["annotations"]["runbook_url"].endswith(runbook), alert["alert"]
        section = text.split(f"## {alert['alert']}", 1)[1].split("\n## ", 1)[0]
        for part in ("What it means", "How to check", "What to do"):
            assert part in section, f"runbook section {alert['alert']} lacks {part!r}"


def test_the_test_bed_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    config = prometheus_config([
        pod_scrape_job("infergrid-workers", tmp_path / "pods.json"),
        static_scrape_job("infergrid-operator", ["127.0.0.1:8080"]),
    ], rule_files=[RULES])
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    res = promtool("check", "config", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    relabel = config["scrape_configs"][0]["relabel_configs"]
    assert {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"], "regex": "worker",
            "action": "keep"} in relabel
    assert {"source_labels": ["__meta_kubernetes_pod_label_infergrid_dev_inferenceservice"],
            "target_label": "service"} in relabel


def test_pod_targets_carry_the_pod_roles_labels() -> None:
    pod = {"metadata": {"namespace": "team-a", "name": "llama-worker-x", "uid": "u1",
                        "labels": {"app.kubernetes.io/component": "worker", "infergrid.dev/inferenceservice": "llama"}},
           "spec": {"nodeName": "gpu-node-0", "containers": [
               {"name": "worker", "ports": [{"name": "http", "containerPort": 8000}]}, {"name": "sidecar"}]},
           "status": {"podIP": "10.244.0.7", "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
    pending = {"metadata": {"namespace": "team-a", "name": "no-ip"}, "spec": {"containers": []}, "status": {}}
    (group,) = pod_targets([pod, pending])
    assert group["targets"] == ["10.244.0.7:8000"]
    labels = group["labels"]
    assert labels["__meta_kubernetes_pod_label_infergrid_dev_inferenceservice"] == "llama"
    assert labels["__meta_kubernetes_pod_label_app_kubernetes_io_component"] == "worker"
    assert labels["__meta_kubernetes_pod_container_port_name"] == "http"
    assert labels["__meta_kubernetes_pod_ready"] == "true" and labels["__meta_kubernetes_pod_phase"] == "Running"
    assert labels["__meta_kubernetes_namespace"] == "team-a"
