"""The autoscaler's loop over a fake API and scrapes: it decides from the cluster's state after a restart
(spec.replicas, status.lastScaleTime, status.lastWake), never from memory, and writes through /scale."""

from __future__ import annotations

import asyncio
import datetime

import pytest
from operator_helpers import isvc_body

from infergrid.operator.autoscaler import loop as loop_module
from infergrid.operator.autoscaler.leadership import Leadership
from infergrid.operator.autoscaler.loop import Monitor, timestamp
from infergrid.operator.cache import ServiceCache
from infergrid.operator.kube import ApiError

T0 = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC).timestamp()
IDLE = 'vllm:num_requests_running{model_name="m"} 0\nvllm:num_requests_waiting{model_name="m"} 0\n'
BUSY = 'vllm:num_requests_running{model_name="m"} 1\nvllm:num_requests_waiting{model_name="m"} 7\n'


class FakeApi:
    """Serves the InferenceService's /scale from the cache body; records writes and deletions."""

    def __init__(self, cache: ServiceCache) -> None:
        self.cache, self.writes, self.deleted, self.events = cache, [], [], []

    async def request(self, method, path, body=None, params=None, content_type=None):
        isvc = self.cache.services[("team-a", "svc")]
        if method == "GET" and path.endswith("/scale"):
            replicas = isvc["spec"].get("replicas")  # like the API server: 0 is omitted from a Scale
            return {"metadata": {"resourceVersion": isvc["metadata"]["resourceVersion"]},
                    "spec": {"replicas": replicas} if replicas else {}}
        if method == "PATCH" and path.endswith("/scale"):
            if body["metadata"]["resourceVersion"] != isvc["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", "the object has been modified")
            self.writes.append(body["spec"]["replicas"])
            isvc["spec"]["replicas"] = body["spec"]["replicas"]  # the watch echo, at once
            isvc["metadata"]["resourceVersion"] = str(int(isvc["metadata"]["resourceVersion"]) + 1)
            return {}
        raise AssertionError((method, path))

    async def merge_patch(self, api_version, kind, namespace, name, patch, subresource=None):
        assert (kind, subresource) == ("InferenceService", None)  # the first write, before spec.replicas exists
        return await self.request("PATCH", "/scale", body=patch)

    async def create(self, obj):
        assert obj["kind"] == "Event" and obj["involvedObject"]["name"] == "svc"
        self.events.append({"reason": obj["reason"], "type": obj["type"], "message": obj["message"]})
        return obj

    async def delete(self, api_version, kind, namespace, name):
        self.deleted.append(name)
        return {}


def service(replicas: int | None, status: dict, min_replicas: int = 1) -> dict:
    extra = {} if replicas is None else {"replicas": replicas}
    body = isvc_body("svc", **extra, autoscaling={"minReplicas": min_replicas, "maxReplicas": 4,
                                                           "targetQueueDepth": 1, "scaleDownDelaySeconds": 30},
                     engine={"maxNumSeqs": 1})
    body["metadata"]["resourceVersion"] = "10"
    body["status"] = status
    return body


def pod(name: str, ip: str) -> dict:
    return {"metadata": {"name": name, "namespace": "team-a", "labels": {"infergrid.dev/inferenceservice": "svc"}},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True",
                                                    "lastTransitionTime": "2026-01-01T11:00:00Z"}],
                       "containerStatuses": [{"name": "worker", "started": True, "restartCount": 0,
                                              "state": {"running": {}}}]}}


@pytest.fixture
def world():
    cache = ServiceCache()
    api = FakeApi(cache)
    clock = [T0]
    metrics_text = {"10.0.0.1": IDLE, "10.0.0.2": IDLE, "10.0.0.3": IDLE}
    events = api.events

    def monitor() -> Monitor:  # a new operator process: nothing in memory
        m = Monitor(api, cache, Leadership(api, None, 0), on_change=lambda key: None, clock=lambda: clock[0])

        async def get(url: str) -> str:
            return metrics_text[url.split("//")[1].split(":")[0]]
        m._get = get  # type: ignore[method-assign]
        return m

    for i in (1, 2, 3):
        cache.update_pod("ADDED", pod(f"w{i}", f"10.0.0.{i}"))
    return cache, api, clock, metrics_text, events, monitor


def run_ticks(m: Monitor, clock: list, seconds: float) -> None:
    async def go():
        for _ in range(int(seconds / 2)):
            await m.tick()
            clock[0] += 2
    asyncio.run(go())


def test_a_restart_right_after_a_scale_waits_the_full_delay_from_last_scale_time(world):
    cache, api, clock, _, events, monitor = world
    cache.update_service("ADDED", service(3, {"lastScaleTime": timestamp(T0 - 20), "lastScaleReason": "queue"}))
    run_ticks(monitor(), clock, 8)  # idle, but the last scale was 20 s ago and this process just started
    assert api.writes == []
    restarted = monitor()  # killed and restarted: the delay counts from this process' first look
    run_ticks(restarted, clock, 26)
    assert api.writes == []
    run_ticks(restarted, clock, 8)
    assert api.writes == [1] and events[-1]["reason"] == "ScaledDown"
    assert restarted.services[("team-a", "svc")].last_scale[1] == "low-load"


def test_scale_up_is_written_once_and_a_stale_view_is_never_written(world):
    cache, api, clock, metrics_text, _, monitor = world
    cache.update_service("ADDED", service(None, {}))  # created without spec.replicas: the Deployment has 1
    cache.update_deployment("ADDED", {"metadata": {"labels": {"infergrid.dev/inferenceservice": "svc"},
                                                   "namespace": "team-a"}, "spec": {"replicas": 1}})
    for ip in list(metrics_text)[1:]:
        del metrics_text[ip]
    for i in (2, 3):
        cache.update_pod("DELETED", pod(f"w{i}", f"10.0.0.{i}"))
    metrics_text["10.0.0.1"] = BUSY  # 8 in flight / (1 + 1) -> 4, at most doubling: 1 -> 2 -> 4
    m = monitor()
    run_ticks(m, clock, 2)
    assert api.writes == [2]
    cache.services[("team-a", "svc")]["spec"]["replicas"] = 3  # someone else scaled meanwhile
    m.services[("team-a", "svc")].echo = None
    stale = loop_module.Decision(4, 4, "up", "queue", "x")
    assert asyncio.run(m._write_scale(("team-a", "svc"), 2, stale)) is False
    assert api.writes == [2]


def test_a_wake_annotation_from_zero_is_acted_on_once_and_remembered_in_status(world):
    cache, api, clock, _, events, monitor = world
    for i in (1, 2, 3):
        cache.update_pod("DELETED", pod(f"w{i}", f"10.0.0.{i}"))
    body = service(0, {"lastWake": "old"}, min_replicas=0)
    body["metadata"]["annotations"] = {"infergrid.dev/wake": "old", "other": "dropped"}
    cache.update_service("ADDED", body)
    assert cache.services[("team-a", "svc")]["metadata"]["annotations"] == {"infergrid.dev/wake": "old"}
    m = monitor()
    run_ticks(m, clock, 6)
    assert api.writes == []  # the value was handled before the restart (status.lastWake)
    body["metadata"]["annotations"]["infergrid.dev/wake"] = "new"
    body["spec"]["replicas"] = cache.services[("team-a", "svc")]["spec"]["replicas"]
    cache.update_service("MODIFIED", body)
    run_ticks(m, clock, 6)
    assert api.writes == [1] and events[-1]["reason"] == "WokenUp"
    assert m.services[("team-a", "svc")].last_wake == "new"


def test_a_worker_whose_scrape_times_out_adds_no_stale_load_and_holds_scale_down(world):
    """A wedged worker's last sample (its stuck requests) is not counted: the load its clients move to the
    other workers is not counted twice (no scale-up from it), and with its metrics missing nothing scales
    down."""
    cache, api, clock, metrics_text, events, monitor = world
    cache.update_service("ADDED", service(3, {"lastScaleTime": timestamp(T0 - 600), "lastScaleReason": "queue"}))
    half = 'vllm:num_requests_running{model_name="m"} 1\nvllm:num_requests_waiting{model_name="m"} 1\n'
    metrics_text.update({"10.0.0.1": half, "10.0.0.2": half, "10.0.0.3": half})  # 6 in flight -> 3: steady
    m = monitor()
    run_ticks(m, clock, 4)
    assert api.writes == []

    async def get(url: str) -> str:
        ip = url.split("//")[1].split(":")[0]
        if ip == "10.0.0.1":
            raise TimeoutError  # SIGSTOPped: the connection is accepted, nothing answers
        return metrics_text[ip]
    m._get = get  # type: ignore[method-assign]
    busier = 'vllm:num_requests_running{model_name="m"} 1\nvllm:num_requests_waiting{model_name="m"} 2\n'
    metrics_text.update({"10.0.0.2": busier, "10.0.0.3": busier})  # its clients moved: 6 in flight on two
    run_ticks(m, clock, 8)
    assert api.writes == []  # 2 + 6 stale would have asked for 4
    metrics_text.update({"10.0.0.2": IDLE, "10.0.0.3": IDLE})
    run_ticks(m, clock, 60)  # idle for twice the delay, but w1's metrics are missing
    assert api.writes == [] and any(e["reason"] == "MetricsMissing" for e in events)
