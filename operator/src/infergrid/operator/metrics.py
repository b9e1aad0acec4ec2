"""The operator's own Prometheus metrics (served on --metrics-port)."""

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("infergrid_operator_reconciles_total", "Reconciles of InferenceServices", ["result"])
RECONCILE_SECONDS = Histogram("infergrid_operator_reconcile_duration_seconds", "Time to apply all children",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
STATUS_WRITES = Counter("infergrid_operator_status_writes_total", "Status subresource writes", ["result"])
EVENTS_POSTED = Counter("infergrid_operator_events_total", "Kubernetes Events posted", ["type", "reason"])
SERVICES = Gauge("infergrid_operator_inferenceservices", "InferenceServices seen by this operator")
READY_SERVICES = Gauge("infergrid_operator_inferenceservices_ready", "InferenceServices with Ready=True")

# The autoscaler and health monitor (names shared with the router's dashboards: `infergrid:` prefix).
AUTOSCALER_DESIRED = Gauge("infergrid:autoscaler_desired_replicas", "Worker replicas the autoscaler wants",
                           ["namespace", "service"])
AUTOSCALER_DECISIONS = Counter("infergrid:autoscaler_decisions_total",
                               "Autoscaler decisions (one per service per tick) by direction and reason",
                               ["namespace", "service", "direction", "reason"])
HEALTH_POD_RESTARTS = Counter("infergrid:health_pod_restarts_total",
                              "Worker pods the health monitor deleted for replacement, by reason",
                              ["namespace", "service", "reason"])


def forget_service(namespace: str, service: str) -> None:
    """Drop a deleted (or no longer autoscaled) service's series."""
    for family in (AUTOSCALER_DESIRED, AUTOSCALER_DECISIONS, HEALTH_POD_RESTARTS):
        for labels in [labels for labels in list(family._metrics) if labels[:2] == (namespace, service)]:
            family.remove(*labels)
