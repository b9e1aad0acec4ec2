"""Per-worker health: a pure state machine fed by probe results and request failures.

    NEW --probe ok--> ADMITTED --connect refused / timeout / failed /ready / missed scrape--> EJECTED
                          ^                                                                    |
                          +--------------------------- probe ok -------------------------------+

A worker is routable only while ADMITTED. Ejection is immediate on the first failure (a scrape runs
every second with a sub-second timeout, so a dead or wedged worker is out within 2 s); one successful
probe (/ready 200 and /metrics answered) re-admits it.
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

    @property
    def is_admitted(self) -> bool:
        return self.state is HealthState.ADMITTED

    def on_probe_ok(self) -> bool:
        changed = self.state is not HealthState.ADMITTED
        self.state = HealthState.ADMITTED
        self.num_failures = 0
        return changed

    def on_failure(self, failure: Failure) -> bool:
        """A failed probe or request. Returns True when this ejects an admitted worker."""
        self.num_failures += 1
        self.last_failure = failure
        was_admitted = self.state is HealthState.ADMITTED
        if self.state is not HealthState.NEW:
            self.state = HealthState.EJECTED
        return was_admitted
