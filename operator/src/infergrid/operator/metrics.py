"""The operator's own Prometheus metrics (served on --metrics-port)."""

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("infergrid_operator_reconciles_total", "Reconciles of InferenceServices", ["result"])
RECONCILE_SECONDS = Histogram("infergrid_operator_reconcile_duration_seconds", "Time to apply all children",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
STATUS_WRITES = Counter("infergrid_operator_status_writes_total", "Status subresource writes", ["result"])
EVENTS_POSTED = Counter("infergrid_operator_events_total", "Kubernetes Events posted", ["type", "reason"])
SERVICES = Gauge("infergrid_operator_inferenceservices", "InferenceServices seen by this operator")
READY_SERVICES = Gauge("infergrid_operator_inferenceservices_ready", "InferenceServices with Ready=True")
SERVICE_DESIRED_REPLICAS = Gauge("infergrid_operator_service_desired_replicas",
                                 "Worker replicas an InferenceService should have (spec or scale subresource)",
                                 ["namespace", "service"])
SERVICE_READY_REPLICAS = Gauge("infergrid_operator_service_ready_replicas",
                               "Worker pods of an InferenceService that are Ready", ["namespace", "service"])
SERVICE_TTFT_SLO = Gauge("infergrid_operator_service_ttft_slo_seconds",
                         "The TTFT p95 objective an InferenceService sets (spec.autoscaling.targetTTFTSeconds)",
                         ["namespace", "service"])
WORKQUEUE_DEPTH = Gauge("infergrid_operator_workqueue_depth",
                        "Keys waiting in or being processed by one of the operator's work queues", ["queue"])


for _result in ("ok", "error"):  # both series exist from the start, so `rate(...{result="error"})` is 0, not empty
    RECONCILES.labels(_result)
    STATUS_WRITES.labels(_result)
for _queue in ("reconcile", "status"):  # the Runtime binds them to its queues
    WORKQUEUE_DEPTH.labels(_queue)


def set_service_gauges(namespace: str, service: str, *, desired: int, ready: int,
                       ttft_slo_seconds: float | None) -> None:
    """Export one InferenceService's desired and ready worker replicas and its TTFT objective (if any)."""
    SERVICE_DESIRED_REPLICAS.labels(namespace, service).set(desired)
    SERVICE_READY_REPLICAS.labels(namespace, service).set(ready)
    if ttft_slo_seconds is None:
        _remove(SERVICE_TTFT_SLO, namespace, service)
    else:
        SERVICE_TTFT_SLO.labels(namespace, service).set(ttft_slo_seconds)


def forget_service(namespace: str, service: str) -> None:
    """Drop the series of a deleted InferenceService."""
    for gauge in (SERVICE_DESIRED_REPLICAS, SERVICE_READY_REPLICAS, SERVICE_TTFT_SLO):
        _remove(gauge, namespace, service)
    forget_autoscaling(namespace, service)


def _remove(gauge: Gauge, *labels: str) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass

# The autoscaler and health monitor (names shared with the router's dashboards: `infergrid:` prefix).
AUTOSCALER_DESIRED = Gauge("infergrid:autoscaler_desired_replicas", "Worker replicas the autoscaler wants",
                           ["namespace", "service"])
AUTOSCALER_DECISIONS = Counter("infergrid:autoscaler_decisions_total",
                               "Autoscaler decisions (one per service per tick) by direction and reason",
                               ["namespace", "service", "direction", "reason"])
HEALTH_POD_RESTARTS = Counter("infergrid:health_pod_restarts_total",
                              "Worker pods the health monitor deleted for replacement, by reason",
                              ["namespace", "service", "reason"])


def forget_autoscaling(namespace: str, service: str) -> None:
    """Drop the autoscaler's and health monitor's series of a deleted (or no longer autoscaled) service."""
    for family in (AUTOSCALER_DESIRED, AUTOSCALER_DECISIONS, HEALTH_POD_RESTARTS):
        for labels in [labels for labels in list(family._metrics) if labels[:2] == (namespace, service)]:
            family.remove(*labels)
