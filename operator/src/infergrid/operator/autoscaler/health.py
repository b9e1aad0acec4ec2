"""The health monitor's decision, a pure function: what is known about a service's worker pods -> which
one pod to delete (the Deployment replaces it) and why, or none.

A pod is replaced when it is
  Unresponsive      its /metrics answered before and has timed out for UNRESPONSIVE_SECONDS (a wedged or
                    SIGSTOPped process that still holds its socket);
  Stalled           requests waited and no token was generated or prefilled for STALL_SECONDS;
  CrashLooping      its container restarted CRASH_LOOP_RESTARTS times and is down again (not when the
                    worker refused its configuration: a new pod would refuse it too);
  ReadinessFailing  it started, then failed readiness for READINESS_FAILING_SECONDS.
Never more than one at a time per service (none while any worker pod is terminating), with a doubling
back-off between deletions, and never the last ready pod while others are still starting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from infergrid.operator.autoscaler.samples import WorkerSample

UNRESPONSIVE_SECONDS = 15.0
STALL_SECONDS = 20.0
CRASH_LOOP_RESTARTS = 3
READINESS_FAILING_SECONDS = 60.0
BACKOFF_SECONDS = 30.0
MAX_BACKOFF_SECONDS = 600.0

UNRESPONSIVE, STALLED, CRASH_LOOPING, READINESS_FAILING = "Unresponsive", "Stalled", "CrashLooping", \
    "ReadinessFailing"
HEALTH_REASONS = (UNRESPONSIVE, STALLED, CRASH_LOOPING, READINESS_FAILING)  # the restarts counter's `reason`


@dataclasses.dataclass(frozen=True)
class PodHealth:
    """What the monitor knows about one worker pod (times in seconds on the decision's clock)."""

    name: str
    is_ready: bool = True
    is_terminating: bool = False
    is_started: bool = True  # the startup probe passed
    not_ready_since: float | None = None  # when Ready last turned False
    restart_count: int = 0
    is_down: bool = False  # its container is waiting to restart or has exited
    is_config_error: bool = False
    stalled_since: float | None = None
    unresponsive_since: float | None = None


@dataclasses.dataclass(frozen=True)
class HealthAction:
    """Delete `pod`; `reason` is a condition/metric label, `message` names the pod and the evidence."""

    pod: str
    reason: str
    message: str


def backoff_seconds(num_recent: int) -> float:
    """Wait after the `num_recent`-th deletion in a row before the next one."""
    return min(BACKOFF_SECONDS * 2 ** max(0, num_recent - 1), MAX_BACKOFF_SECONDS)


def plan_health(pods: Sequence[PodHealth], now: float, *, last_deletion: float | None = None,
                num_recent: int = 0) -> HealthAction | None:
    """The one pod to delete now, or None (see the module docstring)."""
    if any(p.is_terminating for p in pods):
        return None
    if last_deletion is not None and now - last_deletion < backoff_seconds(num_recent):
        return None
    live = [p for p in pods if not p.is_terminating]
    num_ready = sum(p.is_ready for p in live)
    is_anyone_starting = any(not p.is_ready for p in live)
    for pod in sorted(live, key=lambda p: p.name):
        found = _problem(pod, now)
        if found is None:
            continue
        if pod.is_ready and num_ready == 1 and is_anyone_starting:
            continue  # the last one serving stays until another is ready
        reason, evidence = found
        return HealthAction(pod.name, reason, f"worker pod {pod.name} is {evidence}; deleted so that its "
                                              f"Deployment replaces it")
    return None


def _problem(pod: PodHealth, now: float) -> tuple[str, str] | None:
    if pod.unresponsive_since is not None and now - pod.unresponsive_since >= UNRESPONSIVE_SECONDS:
        return UNRESPONSIVE, f"unresponsive: its metrics scrape has timed out for {now - pod.unresponsive_since:.0f}s"
    if pod.stalled_since is not None and now - pod.stalled_since >= STALL_SECONDS:
        return STALLED, (f"stalled: requests have waited with no token generated for "
                         f"{now - pod.stalled_since:.0f}s")
    if pod.is_down and pod.restart_count >= CRASH_LOOP_RESTARTS and not pod.is_config_error:
        return CRASH_LOOPING, f"crash looping: its container restarted {pod.restart_count} times"
    if pod.is_started and not pod.is_ready and pod.not_ready_since is not None \
            and now - pod.not_ready_since >= READINESS_FAILING_SECONDS:
        return READINESS_FAILING, f"failing readiness for {now - pod.not_ready_since:.0f}s after it had started"
    return None


def stalled_since(samples: Sequence[WorkerSample]) -> float | None:
    """Since when requests have waited while the worker made no progress (None unless that holds now).

    Progress is any token generated or prefilled, or a request finished (a long prefill is not a stall).
    The start is the earliest sample of the run, up to the latest, that all had requests waiting and the
    same progress count.
    """
    if not samples or samples[-1].waiting <= 0:
        return None
    progress = samples[-1].progress
    since = samples[-1].time
    for sample in reversed(samples):
        if sample.waiting <= 0 or sample.progress != progress:
            break
        since = sample.time
    return since
