"""The operator's per-service and work-queue gauges (what the Overview and Fleet dashboards query)."""

from prometheus_client import REGISTRY

from infergrid.operator import metrics


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_service_replica_gauges_are_set_and_dropped_with_the_service():
    metrics.set_service_gauges("team-a", "llama", desired=3, ready=2, ttft_slo_seconds=0.5)
    assert sample("infergrid_operator_service_desired_replicas", namespace="team-a", service="llama") == 3
    assert sample("infergrid_operator_service_ready_replicas", namespace="team-a", service="llama") == 2
    assert sample("infergrid_operator_service_ttft_slo_seconds", namespace="team-a", service="llama") == 0.5
    metrics.set_service_gauges("team-a", "llama", desired=3, ready=3, ttft_slo_seconds=None)  # SLO removed
    assert sample("infergrid_operator_service_ttft_slo_seconds", namespace="team-a", service="llama") is None
    metrics.forget_service("team-a", "llama")
    assert sample("infergrid_operator_service_ready_replicas", namespace="team-a", service="llama") is None
    metrics.forget_service("team-a", "llama")  # twice is harmless


def test_workqueue_depth_reads_the_queue_at_scrape_time():
    depth = [4]
    metrics.WORKQUEUE_DEPTH.labels("test").set_function(lambda: depth[0])
    assert sample("infergrid_operator_workqueue_depth", queue="test") == 4
    depth[0] = 0
    assert sample("infergrid_operator_workqueue_depth", queue="test") == 0


def test_error_counters_exist_before_the_first_error():
    assert sample("infergrid_operator_reconciles_total", result="error") is not None
    assert sample("infergrid_operator_status_writes_total", result="error") is not None
