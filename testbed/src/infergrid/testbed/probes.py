"""Kubernetes probes (httpGet, tcpSocket, exec) run against a pod IP, as a kubelet would."""

from __future__ import annotations

import math
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx


def _port(value: Any, container: dict[str, Any]) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    for p in container.get("ports", []) or []:
        if p.get("name") == value:
            return int(p["containerPort"])
    raise ValueError(f"named port {value!r} not declared by container {container.get('name')!r}")


def run_probe(
    probe: dict[str, Any], pod_ip: str, container: dict[str, Any], env: Mapping[str, str], cwd: str
) -> bool:
    """Run one probe once; True on success (HTTP 200-399, TCP connect, exit code 0)."""
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            h = probe["httpGet"]
            host = h.get("host") or pod_ip
            scheme = h.get("scheme", "HTTP").lower()
            path = h.get("path", "/")
            if not path.startswith("/"):
                path = "/" + path
            headers = {x["name"]: x["value"] for x in h.get("httpHeaders", []) or []}
            url = f"{scheme}://{host}:{_port(h['port'], container)}{path}"
            r = httpx.get(url, headers=headers, timeout=timeout, verify=False, follow_redirects=False)
            return 200 <= r.status_code < 400
        if "tcpSocket" in probe:
            t = probe["tcpSocket"]
            with socket.create_connection((t.get("host") or pod_ip, _port(t["port"], container)), timeout=timeout):
                return True
        if "exec" in probe:
            res = subprocess.run(probe["exec"]["command"], env=dict(env), cwd=cwd, timeout=timeout,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return res.returncode == 0
    except (httpx.HTTPError, OSError, ValueError, subprocess.TimeoutExpired):
        return False
    return True  # grpc and unknown handlers: not emulated, treated as passing


@dataclass
class ProbeState:
    """Schedules one probe and turns results into a status with success/failure thresholds."""

    probe: dict[str, Any]
    started: float
    default_success: bool = False
    #: Probe at most this many seconds apart; failureThreshold is scaled up so that the time a
    #: container may keep failing stays what the pod asked for (only reactions get faster).
    period_cap: float | None = None
    ok: bool = field(init=False)
    next_at: float = field(init=False)
    successes: int = 0
    failures: int = 0

    def __post_init__(self) -> None:
        self.ok = self.default_success
        self.next_at = self.started + float(self.probe.get("initialDelaySeconds", 0))

    @property
    def period(self) -> float:
        """Seconds between probes (the pod's periodSeconds, capped by period_cap)."""
        asked = float(self.probe.get("periodSeconds", 10))
        return min(asked, self.period_cap) if self.period_cap else asked

    @property
    def failure_threshold(self) -> int:
        """Consecutive failures that flip the status (scaled when the period is capped)."""
        asked = int(self.probe.get("failureThreshold", 3))
        return math.ceil(asked * float(self.probe.get("periodSeconds", 10)) / self.period)

    def due(self, now: float | None = None) -> bool:
        """True when the next probe should run."""
        return (now or time.monotonic()) >= self.next_at

    def record(self, success: bool, now: float | None = None) -> bool:
        """Count one result; return the (possibly changed) overall status."""
        self.next_at = (now or time.monotonic()) + self.period
        if success:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(self.probe.get("successThreshold", 1)):
                self.ok = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= self.failure_threshold:
                self.ok = False
        return self.ok
