"""Why a worker container keeps failing, read from a pod's container statuses (pure functions).

A kubelet records each exit in `state.terminated` (the container is down) and, once it restarts or waits
to, in `lastState.terminated`. With `terminationMessagePolicy: FallbackToLogsOnError` (the worker
Deployment sets it) a failed container's `message` is the tail of its log, so a worker that refused
its configuration leaves its own error line there, e.g.

    infergrid-worker serve: error: tensor_parallel_size 4 does not divide the model's num_attention_heads 6; ...

`lastState` is kept forever, so it only counts while the container has not come up since that exit
(waiting to restart, or running but not yet `started`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# `infergrid-worker serve` exits 2 when it refuses its arguments or the model (argparse's convention).
CONFIG_ERROR_EXIT_CODE = 2
CONFIG_ERROR, CRASH_LOOP = "WorkerConfigError", "WorkerCrashLoop"
MAX_MESSAGE_CHARS = 512


@dataclasses.dataclass(frozen=True)
class ContainerFailure:
    """A container's latest failed exit: condition reason and a one-line message."""

    reason: str
    message: str


def one_line(text: str | None, limit: int = MAX_MESSAGE_CHARS) -> str:
    """The last line mentioning 'error' (any case), else the last non-blank line; at most `limit` chars."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return ""
    line = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1])
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _has_come_up_since(container: Mapping[str, Any]) -> bool:
    running = (container.get("state") or {}).get("running")
    if running is None:
        return False
    return bool(container.get("started", container.get("ready", False)))


def container_failure(container: Mapping[str, Any]) -> ContainerFailure | None:
    """The failure one `containerStatuses[]` entry reports, or None while it runs (or ran) fine."""
    state = container.get("state") or {}
    terminated = state.get("terminated")
    if not terminated and not _has_come_up_since(container):
        terminated = (container.get("lastState") or {}).get("terminated")
    if not terminated:
        return None
    code = int(terminated.get("exitCode", 0))
    is_crash_looping = ((state.get("waiting") or {}).get("reason")) == "CrashLoopBackOff"
    if code == 0 and not is_crash_looping:
        return None
    reason = CONFIG_ERROR if code == CONFIG_ERROR_EXIT_CODE else CRASH_LOOP
    detail = one_line(terminated.get("message")) or terminated.get("reason") or "no termination message"
    # NOTE: no restart count in the message: it would change (and cost a status write) on every restart.
    return ContainerFailure(reason, f"container {container.get('name', '?')} exited with code {code}: {detail}")
