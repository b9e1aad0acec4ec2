"""The operator's live state and its two jobs: reconcile children, and keep status in step with them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf

from infergrid.operator import constants as c
from infergrid.operator import metrics
from infergrid.operator.apply import ChildOwnedElsewhere, apply_children
from infergrid.operator.autoscaler.leadership import Leadership
from infergrid.operator.autoscaler.loop import Monitor
from infergrid.operator.builders import (
    build_children,
    build_router_pod_template,
    build_worker_pod_template,
    endpoint_url,
    selector_string,
)
from infergrid.operator.builders.monitoring import MONITORING_GROUP_VERSION
from infergrid.operator.cache import Key, ServiceCache
from infergrid.operator.config import OperatorConfig
from infergrid.operator.kube import ApiError, KubeClient
from infergrid.operator.spec import ServiceSpec, desired_replicas
from infergrid.operator.status import OWNED_KEYS, Observed, compute_status, transition_events
from infergrid.operator.workqueue import WorkQueue

logger = logging.getLogger(__name__)

MONITOR_CHECK_SECONDS = 60.0


@dataclasses.dataclass
class Runtime:
    """Everything the handlers share: API client, config, the watch cache, two work queues, the monitor.

    Level-triggered: every InferenceService whose (uid, generation) has not been reconciled by this
    process is queued, so a restart reconciles everything once and nothing is tracked in annotations.
    The monitor (autoscaler + health) runs as one task, acting only while this replica is the active
    one under peering (`peering` None: standalone).
    """

    api: KubeClient
    config: OperatorConfig
    peering_lifetime: int = 30
    peering: str | None = None
    priority: int = 0
    clusterwide: bool = True
    cache: ServiceCache = dataclasses.field(default_factory=ServiceCache)
    reconciler: WorkQueue = dataclasses.field(init=False)
    refresher: WorkQueue = dataclasses.field(init=False)
    monitor: Monitor = dataclasses.field(init=False)
    _monitor_task: asyncio.Task[None] | None = None
    _reconciled: dict[Key, tuple[str, int]] = dataclasses.field(default_factory=dict)
    _errors: dict[Key, str] = dataclasses.field(default_factory=dict)
    _hashes: dict[tuple[str, int], tuple[str, str]] = dataclasses.field(default_factory=dict)
    _last_written: dict[Key, dict[str, Any]] = dataclasses.field(default_factory=dict)
    _pod_monitor: tuple[float, bool] = (-1e9, False)

    def __post_init__(self) -> None:
        self.reconciler = WorkQueue(self._reconcile, name="reconcile", delay=0.0,  # type: ignore[arg-type]
                                    on_error=self._report_failure)
        self.refresher = WorkQueue(self._refresh, name="status refresh", delay=0.2)  # type: ignore[arg-type]
        metrics.WORKQUEUE_DEPTH.labels("reconcile").set_function(lambda: self.reconciler.num_busy)
        metrics.WORKQUEUE_DEPTH.labels("status").set_function(lambda: self.refresher.num_busy)
        leadership = Leadership(self.api, self.peering, self.priority, self.clusterwide)
        self.monitor = Monitor(self.api, self.cache, leadership, on_change=lambda key: self.refresher.request(key, 0))

    def start_monitor(self) -> None:
        """Start the autoscaler/health loop (in the running event loop); idempotent."""
        if self._monitor_task is None:
            self._monitor_task = asyncio.create_task(self.monitor.run(), name="autoscaler")

    async def close(self) -> None:
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            await asyncio.gather(self._monitor_task, return_exceptions=True)
        await self.monitor.close()
        await self.reconciler.close()
        await self.refresher.close()
        await self.api.close()

    async def has_pod_monitor(self) -> bool:
        """Whether the PodMonitor CRD is installed (checked at most once a minute)."""
        checked_at, present = self._pod_monitor
        if time.monotonic() - checked_at > MONITOR_CHECK_SECONDS:
            try:
                present = await self.api.has_kind(MONITORING_GROUP_VERSION, "PodMonitor")
            except ApiError as exc:
                logger.warning("cannot discover %s: %s", MONITORING_GROUP_VERSION, exc)
                present = False
            self._pod_monitor = (time.monotonic(), present)
        return present

    # ------------------------------------------------------------------ watch events

    def on_service_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = self.cache.update_service(event_type, body)
        metrics.SERVICES.set(len(self.cache.services))
        if event_type == "DELETED":
            self._reconciled.pop(key, None)
            self._last_written.pop(key, None)
            self._errors.pop(key, None)
            self.reconciler.forget(key)
            metrics.forget_service(*key)
            self.monitor.forget(key)
            return
        meta = body["metadata"]
        if self._reconciled.get(key) != (meta.get("uid"), meta.get("generation")):
            self.reconciler.request(key)
        else:
            self.refresher.request(key)  # e.g. someone edited the status by hand

    def on_deployment_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = self.cache.update_deployment(event_type, body)
        if key is None or key not in self.cache.services:
            return
        owner = self.cache.services[key]
        owner_uids = {ref.get("uid") for ref in body["metadata"].get("ownerReferences") or []}
        if event_type == "DELETED" and owner["metadata"].get("uid") in owner_uids \
                and not owner["metadata"].get("deletionTimestamp"):
            self._reconciled.pop(key, None)  # deleted under a live service: recreate it
            self.reconciler.request(key)
        self.refresher.request(key)

    def on_pod_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = self.cache.update_pod(event_type, body)
        if key is not None and key in self.cache.services:
            self.refresher.request(key)

    def on_router_pod_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        self.cache.update_router_pod(event_type, body)

    # ------------------------------------------------------------------ reconcile

    async def _reconcile(self, key: Key) -> None:
        """Apply every child of one InferenceService, then schedule a status refresh."""
        body = self.cache.services.get(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        meta = body["metadata"]
        version = (meta.get("uid"), meta.get("generation"))
        if self._reconciled.get(key) == version:
            return
        try:
            spec = ServiceSpec.from_body(body)
        except (KeyError, ValueError) as exc:  # the CRD's validation should have refused it
            kopf.event(body, type="Warning", reason="InvalidSpec", message=str(exc))
            self._reconciled[key] = version
            return
        started = time.perf_counter()
        children = build_children(spec, self.config, current_replicas=self.cache.current_replicas(key),
                                  has_pod_monitor=await self.has_pod_monitor())
        try:
            await apply_children(self.api, children)
        except ApiError as exc:
            if exc.status == 403 and "being terminated" in exc.message:
                logger.info("skipping %s/%s: its namespace is being deleted", *key)
                return  # nothing can be created there any more; the namespace takes the service along
            metrics.RECONCILES.labels("error").inc()
            raise
        except Exception:
            metrics.RECONCILES.labels("error").inc()
            raise
        metrics.RECONCILES.labels("ok").inc()
        metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
        self._reconciled[key] = version
        self._errors.pop(key, None)
        self.refresher.request(key)

    def _report_failure(self, key: Key, exc: Exception, failures: int) -> None:
        """An Event on the service for the first failure and then every fifth (the queue retries)."""
        self._errors[key] = f"applying the children failed: {exc}"
        self.refresher.request(key)
        body = self.cache.services.get(key)
        if body is not None and (failures == 1 or failures % 5 == 0):
            reason = "ChildOwnedElsewhere" if isinstance(exc, ChildOwnedElsewhere) else "ReconcileFailed"
            kopf.event(body, type="Warning", reason=reason, message=f"{exc} (attempt {failures}, retrying)")
            metrics.EVENTS_POSTED.labels("Warning", reason).inc()

    def _desired_hashes(self, spec: ServiceSpec) -> tuple[str, str]:
        """The spec hashes of the worker and the router pod templates this spec asks for."""
        cache_key = (spec.uid, spec.generation)
        if cache_key not in self._hashes:
            if len(self._hashes) > 10_000:
                self._hashes.clear()
            self._hashes[cache_key] = tuple(  # type: ignore[assignment]
                template["metadata"]["annotations"][c.ANNOTATION_SPEC_HASH]
                for template in (build_worker_pod_template(spec, self.config),
                                 build_router_pod_template(spec, self.config)))
        return self._hashes[cache_key]

    async def _refresh(self, key: Key) -> None:
        spec = self.cache.live_spec(key)
        if spec is None:
            return  # gone, being deleted, or unparseable (the reconcile handler reports that)
        body = self.cache.services[key]
        deploy = self.cache.deployments.get(key)
        worker_hash, router_hash = self._desired_hashes(spec)
        track = self.monitor.services.get(key)
        observed = Observed(
            generation=spec.generation,
            desired_replicas=desired_replicas(spec, deploy.spec_replicas if deploy else None),
            desired_hash=worker_hash,
            gpus_per_pod=spec.engine.tensor_parallel_size,
            gpu_resource_name=spec.resources.gpu_resource_name,
            selector=selector_string(spec),
            endpoint=endpoint_url(spec),
            deployment=deploy,
            pods=tuple(self.cache.pods.get(key, {}).values()),
            reconcile_error=self._errors.get(key),
            router_replicas=spec.router.replicas,
            router_hash=router_hash,
            router=self.cache.routers.get(key),
            is_autoscaled=spec.is_autoscaled,
            scaling=track.scaling if track else None,
            last_scale=track.last_scale if track else None,
            last_wake=track.last_wake if track else None,
            health=track.health if track else None,
        )
        # NOTE: what this process wrote last is fresher than the watched body until the echo arrives.
        old = {**(body.get("status") or {}), **self._last_written.get(key, {})}
        new = compute_status(observed, old)
        metrics.set_service_gauges(spec.namespace, spec.name, desired=observed.desired_replicas,
                                   ready=new["readyReplicas"], ttft_slo_seconds=spec.autoscaling.target_ttft_seconds
                                   if spec.autoscaling is not None else None)
        if new == old:
            return
        owned = {k: v for k, v in new.items() if k in OWNED_KEYS}
        ready = next(cond for cond in new["conditions"] if cond["type"] == "Ready")
        logger.info("status of %s/%s: Ready=%s (%s), %d/%d workers ready, changed %s", spec.namespace, spec.name,
                    ready["status"], ready["reason"], new["readyReplicas"], new["replicas"],
                    sorted(k for k, v in owned.items() if old.get(k) != v))
        try:
            await self.api.merge_patch(c.API_VERSION, c.KIND, spec.namespace, spec.name, {"status": owned},
                                       subresource="status")
        except ApiError as exc:
            if exc.status == 404:
                return
            metrics.STATUS_WRITES.labels("error").inc()
            raise
        metrics.STATUS_WRITES.labels("ok").inc()
        self._last_written[key] = owned
        for event in transition_events(old, new):
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)
            metrics.EVENTS_POSTED.labels(event.type, event.reason).inc()
        metrics.READY_SERVICES.set(sum(
            1 for status in self._last_written.values()
            for cond in status.get("conditions", []) if cond["type"] == "Ready" and cond["status"] == "True"))
