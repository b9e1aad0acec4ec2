"""The operator's own Prometheus metrics (served on --metrics-port)."""

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("infergrid_operator_reconciles_total", "Reconciles of InferenceServices", ["result"])
RECONCILE_SECONDS = Histogram("infergrid_operator_reconcile_duration_seconds", "Time to apply all children",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
STATUS_WRITES = Counter("infergrid_operator_status_writes_total", "Status subresource writes", ["result"])
EVENTS_POSTED = Counter("infergrid_operator_events_total", "Kubernetes Events posted", ["type", "reason"])
SERVICES = Gauge("infergrid_operator_inferenceservices", "InferenceServices seen by this operator")
READY_SERVICES = Gauge("infergrid_operator_inferenceservices_ready", "InferenceServices with Ready=True")
