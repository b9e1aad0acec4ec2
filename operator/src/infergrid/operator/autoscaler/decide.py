"""The autoscaler's decision, a pure function: metrics window + spec + cluster state + now -> desired replicas.

    recommendation = max(queue, kv, ttft, 1 if any traffic else 0), within [minReplicas, maxReplicas]
      queue: requests in flight / (requests one replica runs at once + targetQueueDepth)
      kv:    sum of busy replicas' KV cache usage / targetKVCacheUsage
      ttft:  p95 time to first token over the last TTFT_WINDOW_SECONDS, since the last scale and the newest
             ready worker (histogram bucket deltas; not while workers are starting):
             above the target -> ready replicas x p95 / target; above half of it -> hold; else no opinion

Up: at once, at most doubling per step. Down: only when every recommendation of the last
scaleDownDelaySeconds was lower (the target is their maximum), the last scale (status.lastScaleTime) and
this process's first look (`observed_since`) are that long ago, every ready worker reported fresh
metrics and no worker is still starting. So a restart never shortens a delay, and missing metrics hold.
To zero only when minReplicas is 0 and nothing ran, waited or was counted for the whole delay; from zero
on a held request at the router or an explicit wake.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from infergrid.operator.autoscaler.samples import WorkerSample

SCALE_UP_FACTOR = 2
STALE_SECONDS = 10.0  # a ready worker without a sample this recent has missing metrics
TTFT_WINDOW_SECONDS = 30.0
TTFT_HOLD_FRACTION = 0.5

UP, DOWN, HOLD = "up", "down", "hold"
# Every (direction, reason) a Decision can carry: the labels of infergrid:autoscaler_decisions_total,
# whose series start at 0 for an autoscaled service (so that the first scale-up is an increase()).
OUTCOMES = ((UP, "bounds"), (UP, "queue"), (UP, "kv"), (UP, "ttft"), (UP, "traffic"), (UP, "wake"),
            (DOWN, "bounds"), (DOWN, "idle"), (DOWN, "low-load"),
            (HOLD, "steady"), (HOLD, "metrics-missing"), (HOLD, "starting"), (HOLD, "stabilizing"))


@dataclasses.dataclass(frozen=True)
class Targets:
    """`spec.autoscaling` plus the engine's `maxNumSeqs` (what one replica runs at once)."""

    min_replicas: int
    max_replicas: int
    queue_depth: float = 4.0
    kv_cache_usage: float = 0.85
    ttft_seconds: float | None = None
    scale_down_delay_seconds: float = 300.0
    max_num_seqs: int = 256


@dataclasses.dataclass(frozen=True)
class ScaleInputs:
    """Everything one decision reads. Times are seconds on one clock (the operator uses wall time)."""

    now: float
    targets: Targets
    current: int  # spec.replicas in effect
    ready_pods: tuple[str, ...] = ()  # worker pods expected to report metrics
    starting_pods: tuple[str, ...] = ()  # worker pods not ready yet (and not terminating)
    samples: Mapping[str, Sequence[WorkerSample]] = dataclasses.field(default_factory=dict)  # oldest first
    held_requests: float = 0.0  # the routers' infergrid:router_held_requests
    wake: bool = False  # the infergrid.dev/wake annotation changed
    last_scale_time: float | None = None  # status.lastScaleTime
    observed_since: float = 0.0  # this process's first look at the service at its current size
    serving_since: float | None = None  # when the newest ready worker became ready
    history: Sequence[tuple[float, int]] = ()  # earlier recommendations (time, replicas), oldest first


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do now. `recommendation` goes into the next call's `history`."""

    desired: int
    recommendation: int
    direction: str  # up | down | hold
    reason: str  # a short label (metrics, condition reasons): queue, kv, ttft, traffic, wake, idle, ...
    message: str

    def __post_init__(self) -> None:
        if (self.direction, self.reason) not in OUTCOMES:
            raise ValueError(f"decision {self.direction}/{self.reason} is not in OUTCOMES (the metric's labels)")

    @property
    def is_change(self) -> bool:
        return self.direction != HOLD


@dataclasses.dataclass(frozen=True)
class Signals:
    """The load seen in the freshest sample of every reporting worker."""

    in_flight: float
    waiting: float
    kv_usage: float
    ttft_p95: float | None
    ttft_count: float
    is_traffic: bool
    recommendations: dict[str, int]


def decide(inputs: ScaleInputs) -> Decision:
    """The desired replica count and why (see the module docstring)."""
    t, current, now = inputs.targets, inputs.current, inputs.now
    low, high = t.min_replicas, t.max_replicas
    if not low <= current <= high:
        desired = min(max(current, low), high)
        return Decision(desired, desired, UP if desired > current else DOWN, "bounds",
                        f"{current} replicas is outside [{low}, {high}]: scaled to {desired}")
    missing = sorted(pod for pod in inputs.ready_pods if not _fresh(inputs.samples.get(pod), now))
    signals = measure(inputs)
    reason, wanted = max(signals.recommendations.items(), key=lambda item: item[1], default=("idle", 0))
    wanted = min(max(wanted, low), high)
    summary = describe(signals, t)
    blockers = [f"metrics missing from pod {', '.join(missing)}"] if missing else []
    if inputs.starting_pods:
        blockers.append(f"{len(inputs.starting_pods)} worker pod(s) not ready yet")
    # While something is unknown or starting, the recommendation kept for later agreement is "no less".
    recommendation = max(wanted, current) if blockers else wanted

    if wanted > current:
        desired = min(wanted, max(current * SCALE_UP_FACTOR, 1))
        return Decision(desired, recommendation, UP, reason,
                        f"scaled up {current} -> {desired} ({reason}): {summary}")
    if wanted == current:
        return Decision(current, recommendation, HOLD, "steady", f"{current} replica(s) meet the targets: {summary}")
    if blockers:
        return Decision(current, recommendation, HOLD, "metrics-missing" if missing else "starting",
                        f"holding at {current}: {'; '.join(blockers)}")
    delay = t.scale_down_delay_seconds
    since = max(inputs.last_scale_time or -math.inf, inputs.observed_since)
    if now - since < delay:
        return Decision(current, recommendation, HOLD, "stabilizing",
                        f"holding at {current}: scale-down waits for {delay:g}s of lower load "
                        f"(scaleDownDelaySeconds) since the last scale or operator start")
    window = [r for (when, r) in inputs.history if when >= now - delay]
    target = max([wanted, *window])
    if target >= current:
        return Decision(current, recommendation, HOLD, "stabilizing",
                        f"holding at {current}: load within the last {delay:g}s (scaleDownDelaySeconds) "
                        f"still needed {target}")
    label = "idle" if target == 0 else "low-load"
    return Decision(target, recommendation, DOWN, label, f"scaled down {current} -> {target} ({label}): {summary}")


def measure(inputs: ScaleInputs) -> Signals:
    """Each signal's recommendation from the freshest samples (pods without fresh ones are left out)."""
    t, now = inputs.targets, inputs.now
    latest = {pod: s[-1] for pod, s in inputs.samples.items() if _fresh(s, now)}
    in_flight = sum(s.in_flight for s in latest.values())
    waiting = sum(s.waiting for s in latest.values())
    queued = [s.running for s in latest.values() if s.waiting > 0]
    # A replica with a queue runs what it runs now (memory or the token budget binds before maxNumSeqs).
    per_replica = max(1.0, sum(queued) / len(queued)) if queued else float(t.max_num_seqs)
    kv_usage = sum(s.kv_usage for s in latest.values() if s.in_flight > 0)
    recs: dict[str, int] = {
        "queue": _ceil(in_flight / (per_replica + t.queue_depth)),
        "kv": _ceil(kv_usage / t.kv_cache_usage),
    }
    p95, count = None, 0.0
    if t.ttft_seconds is not None and not inputs.starting_pods:
        # Only requests served at the current size: since the last scale and the newest ready worker.
        start = max(now - TTFT_WINDOW_SECONDS, inputs.serving_since or -math.inf,
                    inputs.last_scale_time or -math.inf)
        p95, count = ttft_p95(inputs.samples, start)
        if p95 is not None:
            ready = max(len(inputs.ready_pods), 1)
            if p95 > t.ttft_seconds:
                recs["ttft"] = _ceil(ready * p95 / t.ttft_seconds)
            elif p95 > TTFT_HOLD_FRACTION * t.ttft_seconds:
                recs["ttft"] = ready
    is_traffic = in_flight > 0 or any(_progressed(s) for s in inputs.samples.values())
    if is_traffic:
        recs["traffic"] = 1
    if inputs.held_requests > 0:
        recs["wake"] = 1
        is_traffic = True
    if inputs.wake:
        recs["wake"] = max(recs.get("wake", 0), 1)
        is_traffic = True
    return Signals(in_flight, waiting, kv_usage, p95, count, is_traffic, recs)


def describe(signals: Signals, t: Targets) -> str:
    """One line a human can check the decision against."""
    parts = [f"{signals.in_flight:g} request(s) in flight, {signals.waiting:g} waiting "
             f"(target {t.queue_depth:g} waiting per replica)",
             f"KV usage {signals.kv_usage:.2f} (target {t.kv_cache_usage:g} per replica)"]
    if t.ttft_seconds is not None:
        p95 = "-" if signals.ttft_p95 is None else f"{signals.ttft_p95:.2f}s"
        parts.append(f"TTFT p95 {p95} over {signals.ttft_count:g} request(s) (target {t.ttft_seconds:g}s)")
    recs = ", ".join(f"{name} {value}" for name, value in signals.recommendations.items())
    return f"{'; '.join(parts)}; wanted: {recs or 'none'}"


def ttft_p95(samples: Mapping[str, Sequence[WorkerSample]], start: float) -> tuple[float | None, float]:
    """p95 of the TTFT histogram's growth since `start`, summed over pods, and the number of requests.

    Each pod contributes its latest buckets minus those of its last sample at or before `start` (or its
    first sample after it); a counter that went down means the worker restarted and counts from zero.
    """
    deltas: dict[float, float] = {}
    for series in samples.values():
        if not series or not series[-1].ttft_buckets:
            continue
        base = next((s for s in reversed(series) if s.time <= start), series[0])
        before = dict(base.ttft_buckets)
        if any(count < before.get(le, 0.0) for le, count in series[-1].ttft_buckets):
            before = {}
        for le, count in series[-1].ttft_buckets:
            deltas[le] = deltas.get(le, 0.0) + count - before.get(le, 0.0)
    if not deltas:
        return None, 0.0
    return histogram_quantile(0.95, sorted(deltas.items())), max(deltas.values())


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket; the last finite bound for +Inf."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def _ceil(value: float) -> int:
    """ceil, blind to float noise (28 requests over 6 replicas must not need 7.000000000000001)."""
    return math.ceil(round(value, 6))


def _fresh(series: Sequence[WorkerSample] | None, now: float) -> bool:
    return bool(series) and now - series[-1].time <= STALE_SECONDS  # type: ignore[index]


def _progressed(series: Sequence[WorkerSample]) -> bool:
    """Whether the worker did any work between its last two samples (a restart counts as work)."""
    if len(series) < 2:
        return False
    before, after = series[-2].progress, series[-1].progress
    return after != before
