"""Operator settings from the environment, the API client's paths, and the CLI."""

import pytest

from infergrid.operator.config import OperatorConfig
from infergrid.operator.kube import object_path
from infergrid.operator.main import parse_args


def test_config_from_env():
    config = OperatorConfig.from_env({
        "INFERGRID_WORKER_IMAGE": "reg/worker:1",
        "INFERGRID_WORKER_IMAGE_PULL_POLICY": "Always",
        "INFERGRID_PROMETHEUS_POD_LABELS": '{"app": "prom"}',
        "INFERGRID_PROMETHEUS_NAMESPACE_LABELS": '{"team": "mon"}',
        "INFERGRID_RUN_AS_USER": "2000",
    })
    assert config.worker_image == "reg/worker:1" and config.worker_image_pull_policy == "Always"
    assert config.prometheus_pod_labels == {"app": "prom"}
    assert config.prometheus_namespace_labels == {"team": "mon"}
    assert config.run_as_user == 2000
    assert OperatorConfig.from_env({}) == OperatorConfig()


@pytest.mark.parametrize("env", [
    {"INFERGRID_PROMETHEUS_POD_LABELS": "[1]"},
    {"INFERGRID_WORKER_IMAGE_PULL_POLICY": "Sometimes"},
    {"INFERGRID_RUN_AS_USER": "0"},
])
def test_bad_config_is_refused(env):
    with pytest.raises(ValueError):
        OperatorConfig.from_env(env)


def test_object_paths():
    assert object_path("apps/v1", "Deployment", "ns", "w") == "/apis/apps/v1/namespaces/ns/deployments/w"
    assert object_path("v1", "Service", "ns") == "/api/v1/namespaces/ns/services"
    assert object_path("infergrid.dev/v1alpha1", "InferenceService", "a", "b") == \
        "/apis/infergrid.dev/v1alpha1/namespaces/a/inferenceservices/b"


def test_cli_defaults_and_random_priority(monkeypatch):
    monkeypatch.delenv("INFERGRID_PRIORITY", raising=False)
    first, second = parse_args([]), parse_args([])
    assert first.peering == "infergrid" and not first.standalone and first.namespace == []
    assert first.metrics_port == 8080 and first.health_port == 8081
    assert first.priority != second.priority  # replicas of one Deployment must never tie
    monkeypatch.setenv("INFERGRID_PRIORITY", "7")
    assert parse_args(["-n", "team-a", "-n", "team-b"]).priority == 7
    assert parse_args(["-n", "team-a", "-n", "team-b"]).namespace == ["team-a", "team-b"]
