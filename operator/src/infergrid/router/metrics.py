"""The router's own Prometheus metrics (names and labels are a contract with the operator and dashboards)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from infergrid.router.health import Failure


class RouterMetrics:
    """One registry per router (tests run several in one process). Labelled children are cached: the
    hot path pays a dict lookup, not prometheus-client's label validation."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("infergrid:router_requests", "Requests by worker, policy and outcome",
                                ["worker", "policy", "outcome"], registry=r)
        self.held = Gauge("infergrid:router_held_requests", "Requests held waiting for a ready worker",
                          registry=r)
        self.ready_workers = Gauge("infergrid:router_ready_workers", "Workers admitted for routing", registry=r)
        self.ejections = Counter("infergrid:router_ejections", "Workers ejected from routing",
                                 ["worker", "reason"], registry=r)
        self.retries = Counter("infergrid:router_retries", "Requests retried on another worker", registry=r)
        self.upstream_latency = Histogram(
            "infergrid:router_upstream_latency_seconds", "Time to the upstream's response headers", registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self._request_children: dict[tuple[str, str], Counter] = {}

    def count_request(self, worker: str, outcome: str) -> None:
        child = self._request_children.get((worker, outcome))
        if child is None:
            child = self._request_children[(worker, outcome)] = self.requests.labels(worker, self.policy, outcome)
        child.inc()

    def add_worker(self, worker: str) -> None:
        """A worker joined the pool: its ejection series start at 0 for every reason, so that its first
        ejection is an increase (a series that first appears at 1 is invisible to rate() and increase(),
        and so to the InferGridRouterEjecting alert)."""
        for failure in Failure:
            self.ejections.labels(worker, failure.value)

    def remove_worker(self, worker: str) -> None:
        """A worker left the pool: drop its series (pods come and go; their IPs must not pile up)."""
        for failure in Failure:
            try:
                self.ejections.remove(worker, failure.value)
            except KeyError:
                pass
        for key in [k for k in self._request_children if k[0] == worker]:
            del self._request_children[key]
            self.requests.remove(worker, self.policy, key[1])

    def render(self) -> bytes:
        return generate_latest(self.registry)
