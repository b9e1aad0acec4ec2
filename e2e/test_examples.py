"""Every InferenceService in examples/ is accepted by the real API server, field for field.

`kubectl apply --dry-run=server` runs the CRD's OpenAPI schema, CEL rules, defaulting and kubectl's
strict field validation, but stores nothing; the object it returns must still hold every field the
example wrote (nothing pruned) plus the server's defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from isvc_support import EXAMPLES

from infergrid.testbed.controlplane import ControlPlane

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to `a.b.c` -> value (lists are compared whole)."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(leaves(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: obj}


def test_the_examples_exist() -> None:
    assert {p.name for p in EXAMPLE_FILES} >= {"tiny.yaml", "llama-1b.yaml"}


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.name for p in EXAMPLE_FILES])
def test_example_is_accepted_by_the_api_server(isvc_crds: ControlPlane, k8s_namespace: str, path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert [d["kind"] for d in docs] == ["InferenceService"], path
    doc = docs[0]
    doc["metadata"]["namespace"] = k8s_namespace  # examples name their own namespace (or none)
    result = isvc_crds.kubectl("apply", "--dry-run=server", "--validate=strict", "-o", "json", "-f", "-",
                               input=yaml.safe_dump(doc), check=False)
    assert result.returncode == 0, f"{path.name} refused:\n{result.stderr}"
    stored = json.loads(result.stdout)
    wrote, kept = leaves(doc["spec"]), leaves(stored["spec"])
    assert {k: kept.get(k, "<pruned>") for k in wrote} == wrote, f"{path.name}: fields pruned or changed"
    assert stored["spec"]["engine"]["tensorParallelSize"] >= 1  # defaulted or set
    assert isvc_crds.kubectl("get", "inferenceservices", "-n", k8s_namespace, "-o", "name").stdout == ""
