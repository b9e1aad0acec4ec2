"""The autoscaler's pure decision on scripted series (no cluster): burst, ramp, flapping load, missing
scrapes, a dead worker, a TTFT breach with a short queue, scale to zero and wake, restart continuity."""

from __future__ import annotations

import dataclasses
import math

import pytest

from infergrid.operator.autoscaler.decide import (
    STALE_SECONDS,
    ScaleInputs,
    Targets,
    decide,
    histogram_quantile,
    ttft_p95,
)
from infergrid.operator.autoscaler.samples import WorkerSample, parse_router_held, parse_worker_metrics

TICK = 2.0
BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, math.inf)


@dataclasses.dataclass
class Cluster:
    """A scripted service: `current` replicas, all ready after `startup` seconds; the load is shared."""

    targets: Targets
    current: int
    startup: float = 0.0
    now: float = 1000.0
    last_scale_time: float | None = None
    observed_since: float = 1000.0
    history: list = dataclasses.field(default_factory=list)
    samples: dict = dataclasses.field(default_factory=dict)
    ready_at: dict = dataclasses.field(default_factory=dict)
    decisions: list = dataclasses.field(default_factory=list)
    missing: set = dataclasses.field(default_factory=set)  # pods whose scrapes fail
    ttft: float = 0.05  # every request's TTFT while it runs

    def pods(self) -> list[str]:
        for i in range(self.current):
            self.ready_at.setdefault(f"w{i}", self.now + self.startup)
        return [f"w{i}" for i in range(self.current)]

    def step(self, in_flight: float, **extra) -> None:
        """One tick: scrape (each ready pod takes an equal share of `in_flight`), decide, apply."""
        pods = self.pods()
        ready = [p for p in pods if self.ready_at[p] <= self.now]
        share = in_flight / max(len(ready), 1)
        for pod in ready:
            if pod in self.missing:
                continue
            series = self.samples.setdefault(pod, [])
            prev = series[-1] if series else WorkerSample(time=0.0)
            running = min(share, self.targets.max_num_seqs)
            done = running * TICK  # requests finished this tick, each with self.ttft
            counts = tuple((le, dict(prev.ttft_buckets).get(le, 0.0) + (done if self.ttft <= le else 0.0))
                           for le in BUCKETS)
            series.append(WorkerSample(time=self.now, running=running, waiting=share - running,
                                       kv_usage=min(1.0, running / self.targets.max_num_seqs),
                                       generation_tokens=prev.generation_tokens + 10 * running,
                                       finished_requests=prev.finished_requests + done, ttft_buckets=counts))
        inputs = ScaleInputs(
            now=self.now, targets=self.targets, current=self.current, ready_pods=tuple(ready),
            starting_pods=tuple(p for p in pods if p not in ready),
            samples={p: tuple(s[-30:]) for p, s in self.samples.items() if p in pods},
            last_scale_time=self.last_scale_time, observed_since=self.observed_since,
            serving_since=max((self.ready_at[p] for p in ready), default=None), history=tuple(self.history), **extra)
        decision = decide(inputs)
        self.history = [(t, r) for t, r in self.history if t >= self.now - self.targets.scale_down_delay_seconds]
        self.history.append((self.now, decision.recommendation))
        self.decisions.append(decision)
        if decision.is_change:
            self.current, self.last_scale_time = decision.desired, self.now
            for pod in list(self.ready_at):
                if int(pod[1:]) >= self.current:
                    del self.ready_at[pod]
                    self.samples.pop(pod, None)
        self.now += TICK

    def run(self, seconds: float, in_flight: float, **extra) -> list[int]:
        sizes = []
        for _ in range(int(seconds / TICK)):
            self.step(in_flight, **extra)
            sizes.append(self.current)
        return sizes

    def changes(self) -> list[tuple[str, int, str]]:
        return [(d.direction, d.desired, d.reason) for d in self.decisions if d.is_change]


def targets(**kw) -> Targets:
    return Targets(**{"min_replicas": 1, "max_replicas": 8, "queue_depth": 2, "kv_cache_usage": 1.0,
                      "scale_down_delay_seconds": 20, "max_num_seqs": 2, **kw})


def test_burst_scales_up_at_once_doubling_to_what_the_load_needs_then_back_after_the_delay():
    cluster = Cluster(targets(), current=1)
    sizes = cluster.run(10, in_flight=20)  # 20 in flight / (2 running + 2 waiting) per replica = 5
    assert sizes[:3] == [2, 4, 5] and set(sizes[3:]) == {5}
    assert [c[2] for c in cluster.changes()] == ["queue"] * 3
    quiet = cluster.run(40, in_flight=0)
    assert quiet[:9] == [5] * 9  # 20 s delay since the last scale, and the window still saw the load
    assert quiet[-1] == 1 and cluster.changes()[-1][:2] == ("down", 1)
    assert len(cluster.changes()) == 4  # one step down, straight to what the whole window needed


def test_ramp_scales_up_monotonically_and_never_beyond_the_need():
    cluster = Cluster(targets(max_replicas=16), current=1)
    sizes = []
    for load in range(0, 48, 4):
        sizes += cluster.run(4, in_flight=load)
        assert cluster.current <= max(1, math.ceil(load / 4))
    assert sizes == sorted(sizes) and sizes[-1] == 11
    assert all(d.direction != "down" for d in cluster.decisions)


def test_flapping_load_does_not_oscillate():
    cluster = Cluster(targets(scale_down_delay_seconds=30), current=1)
    sizes = []
    for _ in range(8):  # bursts of 6 s every 12 s
        sizes += cluster.run(6, in_flight=16)
        sizes += cluster.run(6, in_flight=0)
    assert cluster.changes() == [("up", 2, "queue"), ("up", 4, "queue")]  # never down while it flaps
    assert max(sizes) == 4
    cluster.run(40, in_flight=0)
    assert [c[0] for c in cluster.changes()][-1] == "down" and cluster.current == 1


def test_missing_scrapes_hold_a_scale_down_and_say_which_pod():
    cluster = Cluster(targets(), current=1)
    cluster.run(10, in_flight=12)
    assert cluster.current == 3
    cluster.missing = {"w1"}
    cluster.run(20, in_flight=0)  # w1's last sample goes stale after STALE_SECONDS
    holds = [d for d in cluster.decisions[-5:]]
    assert cluster.current == 3
    assert all(d.reason == "metrics-missing" for d in holds), holds
    assert "metrics missing from pod w1" in holds[-1].message
    cluster.missing = set()
    cluster.run(18, in_flight=0)
    assert cluster.current == 3  # the holds counted as "needs 3": a full delay of agreement is needed again
    cluster.run(6, in_flight=0)
    assert cluster.current == 1


def test_a_dead_worker_never_causes_a_scale_down_but_load_elsewhere_still_scales_up():
    cluster = Cluster(targets(), current=2)
    cluster.run(4, in_flight=4)
    cluster.missing = {"w0"}  # its process died: no scrape answers, its readiness not yet failed
    cluster.run(60, in_flight=2)
    assert cluster.current == 2 and {d.reason for d in cluster.decisions[-20:]} == {"metrics-missing"}
    cluster.run(10, in_flight=30)  # the live worker alone reports a queue: scale up all the same
    assert cluster.current > 2 and cluster.changes()[-1][2] == "queue"


def test_ttft_breach_with_a_short_queue_scales_up_and_holds_near_the_target():
    cluster = Cluster(targets(ttft_seconds=1.0, queue_depth=100), current=2)
    cluster.ttft = 2.4  # every request waits 2.4 s for its first token, nothing is queued
    cluster.run(4, in_flight=2)
    assert cluster.changes() == [("up", 4, "ttft")]  # ready 2 x p95 2.4 / target 1 (at most doubling)
    assert "TTFT p95 2.4" in next(d.message for d in cluster.decisions if d.is_change)
    cluster.ttft = 0.8  # above half the target: hold, even long after the delay
    cluster.run(60, in_flight=2)
    assert cluster.current == 4
    cluster.ttft = 0.05
    cluster.run(100, in_flight=2)
    assert cluster.current == 1


def test_scale_to_zero_after_the_delay_without_traffic_then_wake_on_a_held_request_or_annotation():
    cluster = Cluster(targets(min_replicas=0), current=1)
    cluster.run(10, in_flight=1)
    assert cluster.current == 1  # traffic keeps one replica
    sizes = cluster.run(30, in_flight=0)
    assert sizes[-1] == 0 and cluster.changes()[-1] == ("down", 0, "idle")
    # the counters moved on the first idle tick, so zero came a full delay after the last work
    assert sizes.index(0) * TICK >= 20
    cluster.run(20, in_flight=0)
    assert cluster.current == 0  # nothing to scrape, nothing wakes it
    cluster.step(0, held_requests=3)
    assert cluster.changes()[-1] == ("up", 1, "wake")
    cluster.current = 0
    cluster.step(0, wake=True)
    assert cluster.changes()[-1] == ("up", 1, "wake")


def test_min_replicas_one_never_goes_to_zero():
    cluster = Cluster(targets(min_replicas=1), current=1)
    assert set(cluster.run(120, in_flight=0)) == {1}


def test_new_pods_starting_hold_a_scale_down():
    cluster = Cluster(targets(), current=1, startup=30)
    cluster.ready_at["w0"] = 0.0
    cluster.run(4, in_flight=12)
    assert cluster.current > 1
    cluster.run(24, in_flight=0)
    assert cluster.current > 1 and cluster.decisions[-1].reason == "starting"


def test_a_restart_measures_the_delay_from_its_first_look_and_from_last_scale_time():
    base = ScaleInputs(now=5000.0, targets=targets(), current=4, ready_pods=("w0",),
                       samples={"w0": (WorkerSample(time=4999.0),)})
    # The last scale was long ago, but this process only just started: hold for a full delay.
    fresh = decide(dataclasses.replace(base, last_scale_time=1000.0, observed_since=5000.0))
    assert (fresh.direction, fresh.reason) == ("hold", "stabilizing")
    # Long after its start, but the last scale (status.lastScaleTime) was 5 s ago: hold.
    recent = decide(dataclasses.replace(base, last_scale_time=4995.0, observed_since=1000.0))
    assert (recent.direction, recent.reason) == ("hold", "stabilizing")
    later = decide(dataclasses.replace(base, last_scale_time=1000.0, observed_since=1000.0))
    assert (later.direction, later.desired) == ("down", 1)


def test_bounds_are_always_respected():
    assert decide(ScaleInputs(now=0, targets=targets(max_replicas=3), current=5)).desired == 3
    assert decide(ScaleInputs(now=0, targets=targets(min_replicas=2), current=0)).desired == 2
    cluster = Cluster(targets(max_replicas=3), current=1)
    assert max(cluster.run(20, in_flight=100)) == 3


def test_stale_samples_count_as_missing():
    old = WorkerSample(time=100.0, running=0)
    inputs = ScaleInputs(now=100.0 + STALE_SECONDS + 1, targets=targets(), current=2, ready_pods=("a", "b"),
                         samples={"a": (old,), "b": (WorkerSample(time=110.0),)}, observed_since=0)
    decision = decide(inputs)
    assert decision.reason == "metrics-missing" and "pod a" in decision.message


def test_histogram_quantile_and_ttft_window_deltas():
    buckets = [(0.1, 10.0), (1.0, 90.0), (5.0, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.9 * 40 / 80)
    assert histogram_quantile(0.95, buckets) == pytest.approx(1.0 + 4.0 * 5 / 10)
    assert histogram_quantile(0.95, [(1.0, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.99, [(1.0, 0.0), (math.inf, 5.0)]) == 1.0  # +Inf: the last finite bound
    before = WorkerSample(time=10.0, ttft_buckets=((1.0, 100.0), (math.inf, 100.0)))
    after = WorkerSample(time=50.0, ttft_buckets=((1.0, 100.0), (math.inf, 110.0)))  # 10 slow ones since
    assert ttft_p95({"a": (before, after)}, start=20.0) == (1.0, 10.0)
    restarted = WorkerSample(time=50.0, ttft_buckets=((1.0, 3.0), (math.inf, 3.0)))
    assert ttft_p95({"a": (before, restarted)}, start=20.0)[1] == 3.0  # counters went down: from zero


WORKER_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="tiny"} 2.0
vllm:num_requests_waiting{model_name="tiny"} 5.0
vllm:kv_cache_usage_perc{model_name="tiny"} 0.25
vllm:generation_tokens_total{model_name="tiny"} 1234.0
vllm:prompt_tokens_total{model_name="tiny"} 99.0
vllm:request_success_total{finished_reason="stop",model_name="tiny"} 3.0
vllm:request_success_total{finished_reason="length",model_name="tiny"} 4.0
vllm:request_success_created{finished_reason="length",model_name="tiny"} 1.7e9
vllm:time_to_first_token_seconds_bucket{le="0.5",model_name="tiny"} 6.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="tiny"} 7.0
vllm:time_to_first_token_seconds_count{model_name="tiny"} 7.0
"""


def test_parse_worker_and_router_metrics():
    sample = parse_worker_metrics(WORKER_METRICS, time=3.0)
    assert (sample.running, sample.waiting, sample.kv_usage) == (2.0, 5.0, 0.25)
    assert (sample.generation_tokens, sample.prompt_tokens, sample.finished_requests) == (1234.0, 99.0, 7.0)
    assert sample.ttft_buckets == ((0.5, 6.0), (math.inf, 7.0))
    router = "infergrid:router_held_requests 3.0\ninfergrid:router_ready_workers 0.0\n"
    assert parse_router_held(router) == 3.0 and parse_router_held("") == 0.0
