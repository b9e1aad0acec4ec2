"""Per-worker health: a pure state machine fed by probe results and request failures.

    NEW --probe ok--> ADMITTED --connect refused / timeout / failed /ready / missed scrape--> EJECTED
                          ^                                                                    |
                          +--------------------------- probe ok -------------------------------+

A worker is routable only while ADMITTED. Ejection is immediate on the first failure (a scrape runs
every second with a sub-second timeout, so a dead or wedged worker is out within 2 s); one successful
probe (/ready 200 and /metrics answered) re-admits it.

A worker that has answered nothing (every probe timed out) for `--wedged-after` seconds is wedged (a
stopped process, its sockets open): the proxy aborts the requests still in flight on it (pool.py
`on_wedged`), so they end with a clear error instead of waiting out the upstream timeout. A worker that
answers "not ready" (draining after SIGTERM, loading) is never wedged: its in-flight requests finish.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class HealthState(enum.Enum):
    NEW = "new"
    ADMITTED = "admitted"
    EJECTED = "ejected"


class Failure(enum.Enum):
    """Why a worker was ejected (the `reason` label of infergrid:router_ejections_total)."""

    CONNECT = "connect_error"
    TIMEOUT = "timeout"
    NOT_READY = "not_ready"
    SCRAPE = "scrape_failed"


@dataclass
class WorkerHealth:
    """The health of one worker; `on_*` return True when the state changed."""

    state: HealthState = HealthState.NEW
    last_failure: Failure | None = None
    num_failures: int = 0
    silent_since: float | None = None  # monotonic time of the first of the timeouts in a row
    wedged: bool = False  # in-flight requests were aborted in this silent stretch

    @property
    def is_admitted(self) -> bool:
        return self.state is HealthState.ADMITTED

    def on_probe_ok(self) -> bool:
        changed = self.state is not HealthState.ADMITTED
        self.state = HealthState.ADMITTED
        self.num_failures = 0
        self.silent_since = None
        self.wedged = False
        return changed

    def on_failure(self, failure: Failure, now: float) -> bool:
        """A failed probe or request at monotonic time `now`. Returns True when this ejects an admitted
        worker."""
        self.num_failures += 1
        self.last_failure = failure
        if failure is not Failure.TIMEOUT:
            self.silent_since, self.wedged = None, False
        elif self.silent_since is None:
            self.silent_since = now
        was_admitted = self.state is HealthState.ADMITTED
        if self.state is not HealthState.NEW:
            self.state = HealthState.EJECTED
        return was_admitted

    def becomes_wedged(self, now: float, wedged_after: float) -> bool:
        """True once per silent stretch, when it has lasted `wedged_after` seconds."""
        if self.wedged or self.silent_since is None or now - self.silent_since < wedged_after:
            return False
        self.wedged = True
        return True
