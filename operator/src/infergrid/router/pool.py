"""The worker set: membership (from discovery), health (from probes and request failures) and load."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from infergrid.router.health import Failure, WorkerHealth
from infergrid.router.policies import name_hash

log = logging.getLogger(__name__)


class Worker:
    """One worker endpoint (HOST:PORT) with its health and load."""

    __slots__ = ("name", "host", "port", "authority", "base_url", "name_hash", "in_flight", "queue_load", "waiting", "running",
                 "kv_usage", "health")

    def __init__(self, name: str) -> None:
        self.name = name
        host, _, port = name.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.authority = f"[{self.host}]:{port}" if ":" in self.host else f"{host}:{port}"
        self.base_url = f"http://{self.authority}"
        self.name_hash = name_hash(name)
        self.in_flight = 0
        self.queue_load = 0
        self.waiting = 0
        self.running = 0
        self.kv_usage = 0.0
        self.health = WorkerHealth()


class WorkerPool:
    """Members and the routable subset. Listeners are told when the routable set changes."""

    def __init__(self) -> None:
        self.workers: dict[str, Worker] = {}
        self.ready: list[Worker] = []
        self._listeners: list[Callable[[], None]] = []
        self.on_member_added: Callable[[Worker], None] | None = None
        self.on_member_removed: Callable[[Worker], None] | None = None
        self.on_eject: Callable[[Worker, Failure], None] | None = None
        self.on_wedged: Callable[[Worker], None] | None = None
        self.wedged_after = float("inf")

    def add_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def set_members(self, names: Iterable[str]) -> None:
        """Discovery's view: add new endpoints (routable after their first good probe), drop gone ones."""
        wanted = set(names)
        for name in list(self.workers):
            if name not in wanted:
                log.info("worker %s removed", name)
                worker = self.workers.pop(name)
                if self.on_member_removed is not None:
                    self.on_member_removed(worker)
        for name in sorted(wanted - self.workers.keys()):
            log.info("worker %s discovered", name)
            worker = self.workers[name] = Worker(name)
            if self.on_member_added is not None:
                self.on_member_added(worker)
        self._refresh()

    def is_member(self, worker: Worker) -> bool:
        return self.workers.get(worker.name) is worker

    def report_ok(self, worker: Worker) -> None:
        if worker.health.on_probe_ok() and self.is_member(worker):
            log.info("worker %s admitted", worker.name)
            self._refresh()

    def report_failure(self, worker: Worker, failure: Failure) -> None:
        now = time.monotonic()
        if worker.health.on_failure(failure, now) and self.is_member(worker):
            log.warning("worker %s ejected: %s", worker.name, failure.value)
            if self.on_eject is not None:
                self.on_eject(worker, failure)
            self._refresh()
        if worker.health.becomes_wedged(now, self.wedged_after):
            log.warning("worker %s silent for %.1f s: aborting its in-flight requests", worker.name,
                        now - (worker.health.silent_since or now))
            if self.on_wedged is not None:
                self.on_wedged(worker)

    def _refresh(self) -> None:
        self.ready = [w for w in self.workers.values() if w.health.is_admitted]
        for listener in self._listeners:
            listener()
