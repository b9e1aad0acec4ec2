"""kopf handlers: a few lines each; the work lives in `Runtime`, the builders and `status`.

The operator is level-triggered: watch events feed a cache and two keyed work queues (reconcile,
status); the autoscaler/health monitor reads the same cache. No handler patches the InferenceService,
so nothing is stored in its annotations (the autoscaler writes spec.replicas through /scale).
NOTE: every handler is async: sync handlers would run in kopf's thread pool, away from the event loop.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from infergrid.operator import constants as c
from infergrid.operator.config import OperatorConfig
from infergrid.operator.kube import KubeClient
from infergrid.operator.runtime import Runtime

ISVC = (c.GROUP, c.VERSION, c.PLURAL)
DEPLOYMENTS = ("apps", "v1", "deployments")
PODS = ("", "v1", "pods")
MANAGED_LABELS = {c.LABEL_MANAGED_BY: c.MANAGED_BY}
WORKER_LABELS = {**MANAGED_LABELS, c.LABEL_COMPONENT: c.COMPONENT_WORKER}
WORKER_SELECTOR = ",".join(f"{k}={v}" for k, v in WORKER_LABELS.items())
MANAGED_SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED_LABELS.items())
ROUTER_LABELS = {c.LABEL_COMPONENT: c.COMPONENT_ROUTER, c.LABEL_ISVC: kopf.PRESENT}
# Worker pods (status, health, metrics) and router pods (the autoscaler reads their held requests).
POD_SELECTOR = f"{c.LABEL_COMPONENT} in ({c.COMPONENT_WORKER},{c.COMPONENT_ROUTER}),{c.LABEL_ISVC}"


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Tune kopf for many objects and API outages, and create the shared runtime."""
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = c.MANAGED_BY
    settings.peering.stealth = True
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 5
    settings.watching.reconnect_backoff = 1.0
    settings.networking.connect_timeout = 5
    settings.networking.request_timeout = 60
    settings.networking.error_backoffs = (1, 1, 2, 3, 5, 8, 13, 21, 30, 30, 30)
    settings.watching.label_selectors[DEPLOYMENTS] = MANAGED_SELECTOR
    settings.watching.label_selectors[PODS] = POD_SELECTOR
    if "runtime" not in memo:
        memo.runtime = Runtime(api=KubeClient.from_environment(), config=OperatorConfig.from_env(),
                               peering=None if settings.peering.standalone else settings.peering.name,
                               priority=settings.peering.priority, clusterwide=settings.peering.clusterwide)
    settings.peering.lifetime = memo.runtime.peering_lifetime
    memo.runtime.start_monitor()


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    await memo.runtime.close()


@kopf.on.event(*ISVC)
async def track_service(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Every InferenceService not yet reconciled at its current generation is queued for a reconcile."""
    memo.runtime.on_service_event(type, body)


@kopf.on.event(*DEPLOYMENTS, labels=MANAGED_LABELS)
async def track_deployment(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Worker and router Deployment changes feed status; one deleted under a live service is recreated."""
    memo.runtime.on_deployment_event(type, body)


@kopf.on.event(*PODS, labels=WORKER_LABELS)
async def track_pod(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Worker pod readiness and scheduling failures feed status."""
    memo.runtime.on_pod_event(type, body)


@kopf.on.event(*PODS, labels=ROUTER_LABELS)
async def track_router_pod(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Router pod IPs: the autoscaler reads their held requests to wake a service from zero."""
    memo.runtime.on_router_pod_event(type, body)


@kopf.on.probe(id="services")
async def services_seen(memo: kopf.Memo, **_: Any) -> int:
    return len(memo.runtime.cache.services)


@kopf.on.probe(id="queued")
async def work_queued(memo: kopf.Memo, **_: Any) -> int:
    return memo.runtime.reconciler.num_busy + memo.runtime.refresher.num_busy
