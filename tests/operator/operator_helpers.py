"""Shared helpers for the operator tests (plain functions, no fixtures)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "inferenceservices.infergrid.dev.yaml"
CHART = REPO / "charts" / "infergrid"


def isvc_body(name: str = "llama", namespace: str = "team-a", generation: int = 1,
              **spec: Any) -> dict[str, Any]:
    """An InferenceService body as the API server would hand it to the operator."""
    body_spec: dict[str, Any] = {"model": {"source": "hf://meta-llama/Llama-3.2-1B"}}
    body_spec.update(copy.deepcopy(spec))
    return {
        "apiVersion": "infergrid.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": generation},
        "spec": body_spec,
    }


def load_crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def crd_schema() -> dict[str, Any]:
    return load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def container(deployment: dict[str, Any], name: str = "worker") -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def full_command(deployment: dict[str, Any]) -> list[str]:
    worker = container(deployment)
    return [*worker["command"], *worker["args"]]


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]
