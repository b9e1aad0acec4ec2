"""Operator-wide settings (chart values -> environment -> this frozen dataclass)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

ENV_PREFIX = "INFERGRID_"


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """Defaults for every InferenceService this operator reconciles."""

    worker_image: str = "ghcr.io/infergrid/worker:0.1.0"
    worker_image_pull_policy: str | None = None
    # Pods allowed to scrape worker metrics through the NetworkPolicy ({} namespace selector = any namespace).
    prometheus_pod_labels: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"app.kubernetes.io/name": "prometheus"})
    prometheus_namespace_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # The operator's own pods (the autoscaler and health monitor scrape worker metrics): admitted by the
    # worker NetworkPolicy when both are known (the chart sets them; a standalone operator leaves them out).
    operator_pod_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    operator_namespace: str | None = None
    # The router runs from the operator's own image (the `infergrid-router` console script).
    router_image: str = "ghcr.io/infergrid/operator:0.1.0"
    router_image_pull_policy: str | None = None
    run_as_user: int = 1000

    def __post_init__(self) -> None:
        for name in ("worker_image", "router_image"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for name in ("worker_image_pull_policy", "router_image_pull_policy"):
            if getattr(self, name) not in (None, "Always", "IfNotPresent", "Never"):
                raise ValueError(f"{name} {getattr(self, name)!r} is not a pull policy")
        if self.run_as_user <= 0:
            raise ValueError("run_as_user must be a non-root uid (> 0)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        """Read `INFERGRID_*` variables (label maps as JSON objects)."""
        env = os.environ if env is None else env
        kwargs: dict[str, object] = {}
        if value := env.get(ENV_PREFIX + "WORKER_IMAGE"):
            kwargs["worker_image"] = value
        if value := env.get(ENV_PREFIX + "WORKER_IMAGE_PULL_POLICY"):
            kwargs["worker_image_pull_policy"] = value
        if value := env.get(ENV_PREFIX + "ROUTER_IMAGE"):
            kwargs["router_image"] = value
        if value := env.get(ENV_PREFIX + "ROUTER_IMAGE_PULL_POLICY"):
            kwargs["router_image_pull_policy"] = value
        if value := env.get(ENV_PREFIX + "PROMETHEUS_POD_LABELS"):
            kwargs["prometheus_pod_labels"] = _labels(value, "PROMETHEUS_POD_LABELS")
        if value := env.get(ENV_PREFIX + "PROMETHEUS_NAMESPACE_LABELS"):
            kwargs["prometheus_namespace_labels"] = _labels(value, "PROMETHEUS_NAMESPACE_LABELS")
        if value := env.get(ENV_PREFIX + "OPERATOR_POD_LABELS"):
            kwargs["operator_pod_labels"] = _labels(value, "OPERATOR_POD_LABELS")
        if value := env.get(ENV_PREFIX + "OPERATOR_NAMESPACE"):
            kwargs["operator_namespace"] = value
        if value := env.get(ENV_PREFIX + "RUN_AS_USER"):
            kwargs["run_as_user"] = int(value)
        return cls(**kwargs)  # type: ignore[arg-type]


def _labels(text: str, name: str) -> dict[str, str]:
    value = json.loads(text)
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"{ENV_PREFIX}{name} must be a JSON object of strings")
    return value
