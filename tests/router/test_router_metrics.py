"""The router's registry: a worker's ejection series exist at 0 from the moment it joins the pool (so its
first ejection is an increase that rate()/increase() and the InferGridRouterEjecting alert see), and
they go when it leaves."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from infergrid.router.health import Failure
from infergrid.router.metrics import RouterMetrics
from infergrid.router.pool import WorkerPool


def samples(metrics: RouterMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(metrics.render().decode())
            for s in f.samples if s.name == name}


def test_ejection_series_start_at_zero_and_leave_with_the_worker() -> None:
    metrics, pool = RouterMetrics("least-load"), WorkerPool()
    pool.on_member_added = lambda w: metrics.add_worker(w.name)
    pool.on_member_removed = lambda w: metrics.remove_worker(w.name)
    pool.on_eject = lambda w, f: metrics.ejections.labels(w.name, f.value).inc()
    pool.set_members(["10.0.0.1:8000", "10.0.0.2:8000"])
    ejections = samples(metrics, "infergrid:router_ejections_total")
    assert len(ejections) == 2 * len(Failure) and set(ejections.values()) == {0.0}

    first = pool.workers["10.0.0.1:8000"]
    pool.report_ok(first)
    metrics.count_request(first.name, "ok")
    pool.report_failure(first, Failure.TIMEOUT)
    ejections = samples(metrics, "infergrid:router_ejections_total")
    assert ejections[(("reason", "timeout"), ("worker", first.name))] == 1.0
    assert sum(ejections.values()) == 1.0

    pool.set_members(["10.0.0.2:8000"])
    assert {dict(k)["worker"] for k in samples(metrics, "infergrid:router_ejections_total")} == {"10.0.0.2:8000"}
    assert samples(metrics, "infergrid:router_requests_total") == {}
