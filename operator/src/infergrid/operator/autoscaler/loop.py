"""The autoscaler's and health monitor's loop: scrape, decide (pure functions), act. Leader only.

Every INTERVAL_SECONDS the active replica scrapes every worker pod's /metrics (concurrently, with a
timeout), keeps a bounded window per pod, and for each InferenceService
  * asks `health.plan_health` whether one worker pod must go, and deletes it;
  * when autoscaled, asks `decide.decide` for the replica count and writes a change through the
    InferenceService's scale subresource (only if spec.replicas is still what the decision started
    from), posting an Event; the Scaling condition, lastScaleTime and lastScaleReason reach the status
    through the runtime's status writer.
What the decisions must not forget across a restart is read from the cluster (spec.replicas,
status.lastScaleTime, status.lastWake, pods); what lives only here (the window, the recommendations)
can only delay a scale-down after a restart, never hasten it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import logging
import math
import time
from collections.abc import Callable

import aiohttp

from infergrid.operator import constants as c
from infergrid.operator import metrics
from infergrid.operator.autoscaler.decide import (
    HOLD,
    OUTCOMES,
    TTFT_WINDOW_SECONDS,
    Decision,
    ScaleInputs,
    Targets,
    decide,
)
from infergrid.operator.autoscaler.health import (
    HEALTH_REASONS,
    HealthAction,
    PodHealth,
    backoff_seconds,
    plan_health,
    stalled_since,
)
from infergrid.operator.autoscaler.leadership import Leadership
from infergrid.operator.autoscaler.samples import WorkerSample, parse_router_held, parse_worker_metrics
from infergrid.operator.cache import Key, ServiceCache
from infergrid.operator.kube import ApiError, KubeClient
from infergrid.operator.pod_failure import CONFIG_ERROR
from infergrid.operator.spec import ServiceSpec, desired_replicas
from infergrid.operator.status import PodSummary

logger = logging.getLogger(__name__)

INTERVAL_SECONDS = 2.0
SCRAPE_TIMEOUT_SECONDS = 3.0
MAX_CONCURRENT_SCRAPES = 32
MAX_SAMPLES_PER_POD = 256
SAMPLE_WINDOW_SECONDS = TTFT_WINDOW_SECONDS + 30.0  # per pod: the TTFT window, and room for a stall to show
ECHO_WAIT_SECONDS = 10.0  # after a scale write, wait this long at most for the watch to show it

# Scaling condition reasons by decision reason (changes) and hold reason.
CHANGE_REASONS = {"bounds": "OutOfBounds", "wake": "WokenUp", "idle": "ScaledToZero"}
HOLD_REASONS = {"metrics-missing": "MetricsMissing", "stabilizing": "Stabilizing"}


@dataclasses.dataclass
class PodTrack:
    """In-memory scrape history of one worker pod."""

    samples: collections.deque[WorkerSample] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=MAX_SAMPLES_PER_POD))
    last_ok: float | None = None
    timeout_since: float | None = None


@dataclasses.dataclass
class ServiceTrack:
    """In-memory state of one InferenceService (everything here may be lost to a restart)."""

    observed_since: float
    seen_replicas: int | None = None
    history: collections.deque[tuple[float, int]] = dataclasses.field(default_factory=collections.deque)
    echo: tuple[int, float] | None = None  # (replicas written, until when to wait for the watch to show it)
    is_autoscaled: bool = False  # its decision series exist
    scaling: dict[str, str] | None = None  # the Scaling condition: status, reason, message
    last_scale: tuple[str, str] | None = None
    last_wake: str | None = None
    health: tuple[str, str] | None = None  # Degraded (reason, message) after a replacement
    replaced_pod: str | None = None
    last_deletion: float | None = None
    num_recent_deletions: int = 0


def timestamp(seconds: float) -> str:
    """RFC 3339, rounded up to the second (a delay measured from it is never shortened)."""
    return datetime.datetime.fromtimestamp(math.ceil(seconds), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def targets_of(spec: ServiceSpec) -> Targets:
    a = spec.autoscaling
    assert a is not None
    return Targets(min_replicas=a.min_replicas, max_replicas=a.max_replicas, queue_depth=a.target_queue_depth,
                   kv_cache_usage=a.target_kv_cache_usage,
                   ttft_seconds=None if a.target_ttft_seconds is None else float(a.target_ttft_seconds),
                   scale_down_delay_seconds=float(a.scale_down_delay_seconds),
                   max_num_seqs=spec.engine.max_num_seqs)


class Monitor:
    """Scrapes workers and routers, runs both decisions, acts; `run()` loops while the operator lives."""

    def __init__(self, api: KubeClient, cache: ServiceCache, leadership: Leadership,
                 on_change: Callable[[Key], None], clock: Callable[[], float] = time.time) -> None:
        self.api, self.cache, self.leadership = api, cache, leadership
        self.on_change = on_change  # asks the runtime to rewrite the service's status
        self.clock = clock
        self.pods: dict[tuple[Key, str], PodTrack] = {}
        self.services: dict[Key, ServiceTrack] = {}
        self._session: aiohttp.ClientSession | None = None
        self._limit = asyncio.Semaphore(MAX_CONCURRENT_SCRAPES)

    async def run(self) -> None:
        """Tick every INTERVAL_SECONDS until cancelled; one failing tick is logged, never fatal."""
        while True:
            started = time.monotonic()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must outlive one bad tick
                logger.exception("autoscaler tick failed")
            await asyncio.sleep(max(0.1, INTERVAL_SECONDS - (time.monotonic() - started)))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def forget(self, key: Key) -> None:
        """The service is gone: drop its state and its metric series."""
        self.services.pop(key, None)
        for pod_key in [k for k in self.pods if k[0] == key]:
            del self.pods[pod_key]
        metrics.forget_monitoring(*key)

    # ------------------------------------------------------------------ one tick

    async def tick(self) -> None:
        active: dict[str, bool] = {}
        keys = []
        for key in list(self.cache.services):
            if key[0] not in active:
                active[key[0]] = await self.leadership.is_active(key[0])
            if active[key[0]]:
                keys.append(key)
        if not keys:
            return
        now = self.clock()
        await self._scrape_workers(keys, now)
        for key in keys:
            try:
                await self._check_health(key, now)
                await self._autoscale(key, now)
            except ApiError as exc:
                logger.warning("autoscaler: %s/%s: %s", *key, exc)
            except Exception:  # noqa: BLE001 - one service's failure must not stop the others
                logger.exception("autoscaler: %s/%s failed", *key)

    async def _scrape_workers(self, keys: list[Key], now: float) -> None:
        live: set[tuple[Key, str]] = set()
        jobs = []
        for key in keys:
            for pod in self.cache.pods.get(key, {}).values():
                if pod.ip and not pod.is_terminating:
                    live.add((key, pod.name))
                    jobs.append(self._scrape_worker(self.pods.setdefault((key, pod.name), PodTrack()), pod, now))
        for gone in [k for k in self.pods if k not in live and k[0] in keys]:
            del self.pods[gone]
        await asyncio.gather(*jobs)

    async def _scrape_worker(self, track: PodTrack, pod: PodSummary, now: float) -> None:
        try:
            text = await self._get(f"http://{pod.ip}:{c.WORKER_PORT}/metrics")
        except TimeoutError:
            if track.timeout_since is None:
                track.timeout_since = now
            return
        except (aiohttp.ClientError, OSError, ValueError):
            track.timeout_since = None  # refused or failed fast: the process is not there (its probes tell)
            return
        track.samples.append(parse_worker_metrics(text, now))
        track.last_ok, track.timeout_since = now, None
        while track.samples and track.samples[0].time < now - SAMPLE_WINDOW_SECONDS:
            track.samples.popleft()

    async def _router_held(self, key: Key) -> float:
        async def held(ip: str) -> float:
            try:
                return parse_router_held(await self._get(f"http://{ip}:{c.ROUTER_PORT}/metrics"))
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
                return 0.0
        ips = list(self.cache.router_ips.get(key, {}).values())
        return sum(await asyncio.gather(*(held(ip) for ip in ips)))

    async def _get(self, url: str) -> str:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_SECONDS))
        async with self._limit, self._session.get(url) as response:
            response.raise_for_status()
            return await response.text()

    # ------------------------------------------------------------------ health

    async def _check_health(self, key: Key, now: float) -> None:
        track = self._track(key, now)
        pods = self.cache.pods.get(key, {})
        if track.health is not None and track.replaced_pod not in pods and self._all_ready(key):
            track.health = track.replaced_pod = None  # the replacement serves
            self.on_change(key)
        if track.last_deletion is not None and now - track.last_deletion > 2 * backoff_seconds(
                track.num_recent_deletions):
            track.num_recent_deletions = 0
        action = plan_health([self._pod_health(key, pod) for pod in pods.values()], now,
                             last_deletion=track.last_deletion, num_recent=track.num_recent_deletions)
        if action is not None:
            await self._replace(key, track, action, now)

    def _pod_health(self, key: Key, pod: PodSummary) -> PodHealth:
        scraped = self.pods.get((key, pod.name))
        return PodHealth(
            name=pod.name, is_ready=pod.is_ready, is_terminating=pod.is_terminating, is_started=pod.is_started,
            not_ready_since=None if pod.is_ready else parse_time(pod.ready_changed_at),
            restart_count=pod.restart_count, is_down=pod.is_down, is_config_error=pod.broken_reason == CONFIG_ERROR,
            stalled_since=stalled_since(list(scraped.samples)) if scraped else None,
            # NOTE: only a pod whose metrics answered before: a fresh pod not listening yet is not wedged.
            unresponsive_since=scraped.timeout_since if scraped and scraped.last_ok is not None else None,
        )

    async def _replace(self, key: Key, track: ServiceTrack, action: HealthAction, now: float) -> None:
        logger.warning("health: %s/%s: %s", *key, action.message)
        try:
            await self.api.delete("v1", "Pod", key[0], action.pod)
        except ApiError as exc:
            if exc.status != 404:
                raise
        track.last_deletion, track.num_recent_deletions = now, track.num_recent_deletions + 1
        track.health, track.replaced_pod = ("WorkerReplaced", action.message), action.pod
        self.pods.pop((key, action.pod), None)
        metrics.HEALTH_POD_RESTARTS.labels(key[0], key[1], action.reason).inc()
        await self._event(key, "Warning", f"Worker{action.reason}", action.message)
        self.on_change(key)

    def _all_ready(self, key: Key) -> bool:
        deploy = self.cache.deployments.get(key)
        return deploy is not None and deploy.ready_replicas >= deploy.spec_replicas

    # ------------------------------------------------------------------ autoscaling

    async def _autoscale(self, key: Key, now: float) -> None:
        spec = self.cache.live_spec(key)
        if spec is None:
            return
        body = self.cache.services[key]
        track = self._track(key, now)
        if spec.autoscaling is None:
            if track.scaling is not None or track.is_autoscaled:
                track.scaling, track.is_autoscaled = None, False
                metrics.forget_autoscaling(*key)
            return
        if not track.is_autoscaled:
            track.is_autoscaled = True
            metrics.watch_autoscaling(*key, OUTCOMES)
        # spec.replicas as written (a value outside the bounds gets rewritten), else what the workers run.
        current = spec.replicas if spec.replicas is not None else desired_replicas(spec, self.cache.current_replicas(key))
        if track.echo is not None:
            written, until = track.echo
            if current != written and now < until:
                return  # our write has not come back through the watch yet
            track.echo = None
        elif track.seen_replicas is not None and current != track.seen_replicas:
            # Someone else (kubectl scale, an edit) chose a size: its own delay starts now.
            track.observed_since = now
            track.history.clear()
        track.seen_replicas = current

        status = body.get("status") or {}
        wake_value = (body["metadata"].get("annotations") or {}).get(c.ANNOTATION_WAKE)
        is_wake = wake_value is not None and wake_value != (track.last_wake or status.get("lastWake"))
        pods = [p for p in self.cache.pods.get(key, {}).values() if not p.is_terminating]
        ready = tuple(sorted(p.name for p in pods if p.is_ready))
        starting = tuple(sorted(p.name for p in pods if not p.is_ready and p.broken_reason is None
                                and p.unschedulable_message is None))
        # NOTE: not a pod whose scrape is timing out (a wedged worker): its last load is stale, and its
        # clients' retries now count on the other workers. Its metrics are missing: scale-downs hold.
        scraped = {p.name: self.pods.get((key, p.name)) for p in pods}
        samples = {name: tuple(t.samples) for name, t in scraped.items() if t is not None and t.timeout_since is None}
        ready_times = [parse_time(p.ready_changed_at) for p in pods if p.is_ready]
        targets = targets_of(spec)
        delay = targets.scale_down_delay_seconds
        while track.history and track.history[0][0] < now - delay:
            track.history.popleft()
        decision = decide(ScaleInputs(
            now=now, targets=targets, current=current, ready_pods=ready, starting_pods=starting, samples=samples,
            held_requests=await self._router_held(key) if not ready else 0.0, wake=is_wake,
            last_scale_time=parse_time(status.get("lastScaleTime")), observed_since=track.observed_since,
            serving_since=max((t for t in ready_times if t is not None), default=None),
            history=tuple(track.history)))
        track.history.append((now, decision.recommendation))
        metrics.AUTOSCALER_DECISIONS.labels(key[0], key[1], decision.direction, decision.reason).inc()
        if decision.is_change and not await self._write_scale(key, current, decision):
            return  # decided from a stale view (the wake, if any, is seen again next tick)
        changed = False
        if is_wake:
            track.last_wake, changed = wake_value, True
        if decision.is_change:
            track.echo = (decision.desired, now + ECHO_WAIT_SECONDS)
            track.seen_replicas = decision.desired
            track.last_scale = (timestamp(now), decision.reason)
            reason = CHANGE_REASONS.get(decision.reason) or ("ScaledUp" if decision.direction == "up" else "ScaledDown")
            changed |= self._set_scaling(track, "True", reason, decision.message)
            await self._event(key, "Normal", reason, decision.message)
            logger.info("autoscaler: %s/%s: %s", *key, decision.message)
        else:
            changed |= await self._hold(key, track, decision)
        metrics.AUTOSCALER_DESIRED.labels(key[0], key[1]).set(decision.desired)
        if changed:
            self.on_change(key)

    async def _hold(self, key: Key, track: ServiceTrack, decision: Decision) -> bool:
        """The Scaling condition for a hold: only holds that block a scale-down replace the last change."""
        assert decision.direction == HOLD
        reason = HOLD_REASONS.get(decision.reason)
        if reason is None:
            if track.scaling is not None and track.scaling["reason"] not in HOLD_REASONS.values():
                return False  # keep showing the last change while replicas meet the targets or start
            return self._set_scaling(track, "True", "Steady", f"{decision.desired} replica(s) meet the targets")
        was = track.scaling["reason"] if track.scaling else None
        changed = self._set_scaling(track, "False" if reason == "MetricsMissing" else "True", reason,
                                    decision.message)
        if reason == "MetricsMissing" and was != reason:
            await self._event(key, "Warning", reason, decision.message)
        return changed

    @staticmethod
    def _set_scaling(track: ServiceTrack, status: str, reason: str, message: str) -> bool:
        new = {"status": status, "reason": reason, "message": message}
        if track.scaling == new:
            return False
        track.scaling = new
        return True

    async def _write_scale(self, key: Key, current: int, decision: Decision) -> bool:
        """Write spec.replicas through /scale, only if it still is what the decision started from.

        NOTE: the scale subresource answers 500 while spec.replicas does not exist, so the first write
        (a service created without it) merge-patches the object, on the cached resourceVersion.
        """
        ns, name = key
        body = self.cache.services.get(key) or {}
        try:
            if (body.get("spec") or {}).get("replicas") is None:
                patch = {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]},
                         "spec": {"replicas": decision.desired}}
                await self.api.merge_patch(c.API_VERSION, c.KIND, ns, name, patch)
                return True
            scale = await self.api.request("GET", _scale_path(ns, name))
            seen = (scale.get("spec") or {}).get("replicas", 0)  # a Scale omits replicas: 0
            if seen != current:
                logger.info("autoscaler: %s/%s: spec.replicas is %s, not %s: deciding again", ns, name, seen, current)
                return False
            patch = {"metadata": {"resourceVersion": scale["metadata"]["resourceVersion"]},
                     "spec": {"replicas": decision.desired}}
            await self.api.request("PATCH", _scale_path(ns, name), body=patch,
                                   content_type="application/merge-patch+json")
        except ApiError as exc:
            if exc.status in (404, 409):
                return False  # gone, or changed under us: the next tick decides from the new state
            raise
        return True

    def _track(self, key: Key, now: float) -> ServiceTrack:
        if key not in self.services:
            self.services[key] = ServiceTrack(observed_since=now)
            metrics.watch_health(*key, HEALTH_REASONS)
        return self.services[key]

    async def _event(self, key: Key, kind: str, reason: str, message: str) -> None:
        """Post an Event on the InferenceService (directly: this loop runs outside kopf's handler context,
        where `kopf.event` has no queue). A failure is logged, never raised: the status says it too."""
        body = self.cache.services.get(key)
        if body is None:
            return
        meta = body["metadata"]
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta.get("namespace", key[0])},
            "involvedObject": {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": meta["name"],
                               "namespace": meta.get("namespace", key[0]), "uid": meta.get("uid")},
            "type": kind, "reason": reason, "message": message[:1024], "count": 1,
            "firstTimestamp": stamp, "lastTimestamp": stamp,
            "source": {"component": c.MANAGED_BY}, "reportingComponent": c.MANAGED_BY,
        }
        try:
            await self.api.create(event)
        except (ApiError, OSError, TimeoutError) as exc:
            logger.warning("cannot post Event %s on %s/%s: %s", reason, *key, exc)
            return
        metrics.EVENTS_POSTED.labels(kind, reason).inc()


def _scale_path(namespace: str, name: str) -> str:
    return f"/apis/{c.API_VERSION}/namespaces/{namespace}/{c.PLURAL}/{name}/scale"
