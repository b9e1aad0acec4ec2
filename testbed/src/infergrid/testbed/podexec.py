"""Turning a pod's first container into a local command line: env, `$(VAR)` expansion, executable.

This is the part of a kubelet + container runtime the pod runner needs, with the host as the
"image": commands are looked up on PATH (the virtualenv's bin first), not in an image.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from infergrid.testbed.kubeapi import KubeClient

_REF = re.compile(r"\$\$|\$\(([^)]*)\)")


class PodSpecError(ValueError):
    """The container cannot be run locally (no command, unknown executable, missing secret, ...)."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known vars are replaced, `$$` escapes, unknown refs stay."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _REF.sub(sub, text)


def field_ref(pod: dict[str, Any], path: str) -> str:
    """The value of a downward-API fieldRef (metadata.name, status.podIP, metadata.labels['x'], ...)."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
        "status.podIPs": ",".join(p["ip"] for p in status.get("podIPs", []) or []),
    }
    if path in simple:
        return simple[path] or ""
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    raise PodSpecError(f"unsupported fieldRef {path!r}")


def _key_ref(client: KubeClient | None, kind: str, ns: str, ref: dict[str, Any]) -> str | None:
    if client is None:
        raise PodSpecError(f"{kind} reference needs an API client")
    obj = client.get(f"/api/v1/namespaces/{ns}/{kind}s/{ref['name']}", ok_missing=True)
    data = (obj or {}).get("data") or {}
    if ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise PodSpecError(f"{kind} {ns}/{ref['name']} has no key {ref['key']!r}")
    value = data[ref["key"]]
    return base64.b64decode(value).decode() if kind == "secret" else value


def container_env(pod: dict[str, Any], container: dict[str, Any], client: KubeClient | None) -> dict[str, str]:
    """The container's environment as a kubelet would compute it (envFrom, then env in order)."""
    ns = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for src in container.get("envFrom", []) or []:
        prefix = src.get("prefix", "")
        for kind in ("configMap", "secret"):
            ref = src.get(f"{kind}Ref")
            if not ref:
                continue
            obj = client.get(f"/api/v1/namespaces/{ns}/{kind.lower()}s/{ref['name']}", ok_missing=True) if client else None
            if obj is None and not ref.get("optional"):
                raise PodSpecError(f"{kind} {ns}/{ref['name']} not found")
            for k, v in ((obj or {}).get("data") or {}).items():
                env[prefix + k] = base64.b64decode(v).decode() if kind == "secret" else v
    for var in container.get("env", []) or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        src = var["valueFrom"]
        if "fieldRef" in src:
            env[name] = field_ref(pod, src["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in src:
            value = _key_ref(client, "secret", ns, src["secretKeyRef"])
            if value is not None:
                env[name] = value
        elif "configMapKeyRef" in src:
            value = _key_ref(client, "configmap", ns, src["configMapKeyRef"])
            if value is not None:
                env[name] = value
        elif "resourceFieldRef" in src:
            res = src["resourceFieldRef"]["resource"]  # e.g. limits.cpu
            kind, _, rname = res.partition(".")
            env[name] = str((container.get("resources", {}).get(kind) or {}).get(rname, "0"))
        else:
            raise PodSpecError(f"unsupported valueFrom for {name}: {sorted(src)}")
    return env


def default_path_prefix() -> list[str]:
    """Directories searched before PATH: the running interpreter's bin dir (the .venv)."""
    return [str(Path(sys.executable).parent)]


def resolve_argv(
    container: dict[str, Any],
    env: Mapping[str, str],
    search_path: str,
    entrypoints: Mapping[str, list[str]] | None = None,
) -> list[str]:
    """command + args with `$(VAR)` expanded and the executable looked up on `search_path`.

    Without `command` the image's entrypoint is taken from `entrypoints` (keyed by the image's last
    path component without tag, e.g. ``infergrid-worker``), else an executable of that name on PATH.
    """
    command = list(container.get("command") or [])
    args = list(container.get("args") or [])
    if not command:
        image = container.get("image", "")
        base = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
        if entrypoints and base in entrypoints:
            command = list(entrypoints[base])
        elif base and shutil.which(base, path=search_path):
            command = [base]
        else:
            raise PodSpecError(f"container {container.get('name')!r} has no command and image {image!r} "
                               "maps to no local executable")
    argv = [expand(a, env) for a in command + args]
    if "/" not in argv[0]:
        exe = shutil.which(argv[0], path=search_path)
        if exe is None:
            raise PodSpecError(f"executable {argv[0]!r} not found on {search_path}")
        argv[0] = exe
    elif not os.access(argv[0], os.X_OK):
        raise PodSpecError(f"{argv[0]} is not executable here")
    return argv
