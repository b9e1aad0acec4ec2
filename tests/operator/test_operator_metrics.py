"""The operator's per-service and work-queue gauges (what the Overview and Fleet dashboards query)."""

from prometheus_client import REGISTRY

from infergrid.operator import metrics


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_service_replica_gauges_are_set_and_dropped_with_the_service():
    metrics.set_service_replicas("team-a", "llama", desired=3, ready=2)
    assert sample("infergrid_operator_service_desired_replicas", namespace="team-a", service="llama") == 3
    assert sample("infergrid_operator_service_ready_replicas", namespace="team-a", service="llama") == 2
    metrics.forget_service("team-a", "llama")
    assert sample("infergrid_operator_service_ready_replicas", namespace="team-a", service="llama") is None
    metrics.forget_service("team-a", "llama")  # twice is harmless


def test_workqueue_depth_reads_the_queue_at_scrape_time():
    depth = [4]
    metrics.WORKQUEUE_DEPTH.labels("test").set_function(lambda: depth[0])
    assert sample("infergrid_operator_workqueue_depth", queue="test") == 4
    depth[0] = 0
    assert sample("infergrid_operator_workqueue_depth", queue="test") == 0
