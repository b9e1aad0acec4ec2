"""Writing a pod's status the way a kubelet would (readiness, container state, restarts)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from infergrid.testbed.kubeapi import KubeClient


def now() -> str:
    """Kubernetes-style RFC 3339 timestamp (seconds, UTC)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# A kubelet's FallbackToLogsOnError keeps the smaller of the log's last 80 lines and its last 2048 bytes.
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048


def termination_message(container: dict[str, Any], exit_code: int, log_path: Path, offset: int = 0) -> str | None:
    """`terminated.message` as a kubelet writes it for `terminationMessagePolicy: FallbackToLogsOnError`.

    The tail of this run's output (the log from byte `offset` on, the pod runner's own `[pod-runner`
    lines left out) when the container failed; None otherwise. The message file of policy `File` is
    not emulated (no volumes), so that policy never has a message.
    """
    if exit_code == 0 or container.get("terminationMessagePolicy") != "FallbackToLogsOnError":
        return None
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return None
    lines = [line for line in data.splitlines(keepends=True) if not line.startswith(b"[pod-runner")]
    tail = b"".join(lines[-FALLBACK_LOG_LINES:])[-FALLBACK_LOG_BYTES:]
    return tail.decode(errors="replace") or None


def _condition(pod: dict[str, Any], ctype: str, status: str, stamp: str) -> dict[str, Any]:
    old = next((c for c in pod.get("status", {}).get("conditions", []) or [] if c.get("type") == ctype), None)
    transition = old.get("lastTransitionTime", stamp) if old and old.get("status") == status else stamp
    return {"type": ctype, "status": status, "lastTransitionTime": transition}


def patch_status(
    client: KubeClient,
    pod: dict[str, Any],
    ready: bool | None = None,
    container: dict[str, Any] | None = None,
    phase: str | None = None,
) -> dict[str, Any] | None:
    """Patch pods/status: Ready + ContainersReady conditions, the first container's status, phase.

    `container` holds fields merged into the first container's status (``state``, ``lastState``,
    ``restartCount``, ``started``); ``ready`` is copied into it too. Returns the updated pod (None if
    the pod is gone).
    """
    meta = pod["metadata"]
    stamp = now()
    status: dict[str, Any] = {}
    statuses = [dict(s) for s in pod.get("status", {}).get("containerStatuses", []) or []]
    if ready is not None:
        flag = "True" if ready else "False"
        status["conditions"] = [_condition(pod, "Ready", flag, stamp), _condition(pod, "ContainersReady", flag, stamp)]
    if statuses and (container is not None or ready is not None):
        first = statuses[0]
        if container:
            first.update(container)
        if ready is not None:
            first["ready"] = ready
        status["containerStatuses"] = statuses
    if phase:
        status["phase"] = phase
    if not status:
        return pod
    path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status"
    patch = {"metadata": {"uid": meta["uid"]}, "status": status}  # uid: never touch a same-named successor
    return client.strategic_patch(path, patch, ok_missing=True)


def set_ready(client: KubeClient, namespace: str, name: str, ready: bool = True) -> None:
    """Set one pod's readiness (as a kubelet's readiness probe would)."""
    pod = client.get(f"/api/v1/namespaces/{namespace}/pods/{name}")
    assert pod is not None
    patch_status(client, pod, ready=ready)
