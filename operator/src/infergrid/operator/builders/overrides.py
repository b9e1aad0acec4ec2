"""Merge `spec.podTemplate` overrides into a built pod template.

Maps merge recursively; lists of named items (containers, volumes, env, ...) merge item by item on
`name` (new names are appended); any other value in the override replaces the built one.
"""

from __future__ import annotations

import copy
from typing import Any

_NAMED_LISTS = frozenset({
    "containers", "initContainers", "volumes", "env", "volumeMounts", "ports", "imagePullSecrets",
})


def merge_overrides(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return a new dict: `base` with `override` merged in (neither argument is modified)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            merged[key] = merge_overrides(current, value)
        elif key in _NAMED_LISTS and isinstance(current, list) and isinstance(value, list):
            merged[key] = _merge_named(current, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _merge_named(base: list[Any], override: list[Any]) -> list[Any]:
    result = copy.deepcopy(base)
    index = {item.get("name"): i for i, item in enumerate(result) if isinstance(item, dict)}
    for item in override:
        name = item.get("name") if isinstance(item, dict) else None
        if name is not None and name in index:
            result[index[name]] = merge_overrides(result[index[name]], item)
        else:
            result.append(copy.deepcopy(item))
    return result
