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


def test_health_restart_series_start_at_zero_and_outlive_autoscaling():
    from infergrid.operator.autoscaler.health import HEALTH_REASONS

    metrics.watch_health("team-b", "llama", HEALTH_REASONS)
    for reason in HEALTH_REASONS:  # the first restart is then an increase() from 0
        assert sample("infergrid:health_pod_restarts_total", namespace="team-b", service="llama", reason=reason) == 0
    metrics.AUTOSCALER_DESIRED.labels("team-b", "llama").set(2)
    metrics.forget_autoscaling("team-b", "llama")  # autoscaling turned off: the health monitor still watches
    assert sample("infergrid:autoscaler_desired_replicas", namespace="team-b", service="llama") is None
    assert sample("infergrid:health_pod_restarts_total", namespace="team-b", service="llama",
                  reason="Stalled") == 0
    metrics.forget_service("team-b", "llama")
    assert sample("infergrid:health_pod_restarts_total", namespace="team-b", service="llama",
                  reason="Stalled") is None


def test_decision_series_start_at_zero_for_every_outcome():
    from infergrid.operator.autoscaler.decide import OUTCOMES

    metrics.watch_autoscaling("team-c", "llama", OUTCOMES)
    for direction, reason in OUTCOMES:
        assert sample("infergrid:autoscaler_decisions_total", namespace="team-c", service="llama",
                      direction=direction, reason=reason) == 0
    metrics.forget_autoscaling("team-c", "llama")
    assert sample("infergrid:autoscaler_decisions_total", namespace="team-c", service="llama",
                  direction="up", reason="queue") is None


def test_served_in_the_text_format_keeping_colons_even_when_openmetrics_is_asked():
    """What Prometheus sends: an Accept header preferring OpenMetrics (whose prometheus-client writer
    turns infergrid:autoscaler_* into infergrid_autoscaler_*)."""
    import urllib.request

    metrics.AUTOSCALER_DESIRED.labels("team-d", "llama").set(3)
    httpd = metrics.serve(0, "127.0.0.1")
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{httpd.server_port}/metrics", headers={
            "Accept": "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = response.read().decode()
    finally:
        httpd.shutdown()
        httpd.server_close()
        metrics.forget_autoscaling("team-d", "llama")
    assert 'infergrid:autoscaler_desired_replicas{namespace="team-d",service="llama"} 3.0' in text
    assert "infergrid_autoscaler" not in text
