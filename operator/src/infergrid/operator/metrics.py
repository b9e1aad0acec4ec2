"""The operator's own Prometheus metrics (served on --metrics-port by `serve`)."""

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

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
    forget_monitoring(namespace, service)


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


def watch_health(namespace: str, service: str, reasons: tuple[str, ...]) -> None:
    """The health monitor looks after a service: its restart series start at 0 for every reason, so the
    first restart is an increase (a series that first appears at 1 is invisible to increase())."""
    for reason in reasons:
        HEALTH_POD_RESTARTS.labels(namespace, service, reason)


def watch_autoscaling(namespace: str, service: str, outcomes: tuple[tuple[str, str], ...]) -> None:
    """The autoscaler decides for a service: its decision series start at 0 for every (direction, reason)."""
    for direction, reason in outcomes:
        AUTOSCALER_DECISIONS.labels(namespace, service, direction, reason)


def forget_autoscaling(namespace: str, service: str) -> None:
    """Drop the autoscaler's series of a service no longer autoscaled (the health monitor's stay)."""
    _remove_service(namespace, service, (AUTOSCALER_DESIRED, AUTOSCALER_DECISIONS))


def forget_monitoring(namespace: str, service: str) -> None:
    """Drop the autoscaler's and health monitor's series of a deleted service."""
    _remove_service(namespace, service, (AUTOSCALER_DESIRED, AUTOSCALER_DECISIONS, HEALTH_POD_RESTARTS))


def _remove_service(namespace: str, service: str, families: tuple[Gauge | Counter, ...]) -> None:
    for family in families:
        for labels in [labels for labels in list(family._metrics) if labels[:2] == (namespace, service)]:
            family.remove(*labels)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # one line per scrape is noise


def serve(port: int, addr: str = "0.0.0.0") -> ThreadingWSGIServer:
    """Serve the registry on http://addr:port/metrics from a daemon thread, always in Prometheus' text
    format (as the worker and the router serve theirs), whatever the scraper's Accept header asks.

    NOTE: prometheus-client 0.26's OpenMetrics exposition, which Prometheus negotiates by default, writes
    sample names with ':' turned into '_' (infergrid:autoscaler_decisions_total arrives as
    infergrid_autoscaler_decisions_total), so the dashboards and alerts would find nothing; the text
    format keeps names as registered.
    """
    app = make_wsgi_app(REGISTRY)

    def text_format(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ.pop("HTTP_ACCEPT", None)
        return app(environ, start_response)

    class Server(ThreadingWSGIServer):
        address_family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]

    httpd = make_server(addr, port, text_format, Server, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    return httpd
