"""The health monitor's pure decision: which worker pod to replace and why, one at a time, with back-off."""

from __future__ import annotations

import datetime

import pytest

from infergrid.operator.autoscaler.health import (
    CRASH_LOOP_RESTARTS,
    READINESS_FAILING_SECONDS,
    STALL_SECONDS,
    UNRESPONSIVE_SECONDS,
    PodHealth,
    backoff_seconds,
    plan_health,
    stalled_since,
)
from infergrid.operator.autoscaler.leadership import is_active
from infergrid.operator.autoscaler.samples import WorkerSample

NOW = 1000.0


def test_healthy_pods_are_left_alone():
    assert plan_health([PodHealth("a"), PodHealth("b")], NOW) is None


@pytest.mark.parametrize(("pod", "reason", "evidence"), [
    (PodHealth("a", unresponsive_since=NOW - UNRESPONSIVE_SECONDS), "Unresponsive", "metrics scrape has timed out"),
    (PodHealth("a", stalled_since=NOW - STALL_SECONDS - 1), "Stalled", "no token generated"),
    (PodHealth("a", is_ready=False, is_down=True, restart_count=CRASH_LOOP_RESTARTS), "CrashLooping", "restarted 3"),
    (PodHealth("a", is_ready=False, not_ready_since=NOW - READINESS_FAILING_SECONDS), "ReadinessFailing",
     "failing readiness for 60s"),
])
def test_each_problem_is_named_with_the_pod(pod, reason, evidence):
    action = plan_health([pod, PodHealth("b")], NOW)
    assert action is not None and (action.pod, action.reason) == ("a", reason)
    assert evidence in action.message and "worker pod a" in action.message


@pytest.mark.parametrize("pod", [
    PodHealth("a", unresponsive_since=NOW - UNRESPONSIVE_SECONDS + 1),
    PodHealth("a", stalled_since=NOW - STALL_SECONDS + 1),
    PodHealth("a", is_ready=False, is_down=True, restart_count=CRASH_LOOP_RESTARTS - 1),
    # a worker that refused its configuration: a new pod would refuse it too (status reports it)
    PodHealth("a", is_ready=False, is_down=True, restart_count=9, is_config_error=True),
    # still loading its model: never started, so not failing readiness
    PodHealth("a", is_ready=False, is_started=False, not_ready_since=NOW - 600),
], ids=["unresponsive-briefly", "stalled-briefly", "two-restarts", "config-error", "loading"])
def test_not_yet_or_not_fixable_by_a_new_pod(pod):
    assert plan_health([pod, PodHealth("b")], NOW) is None


def test_one_at_a_time_and_with_a_doubling_backoff():
    stalled = PodHealth("a", stalled_since=NOW - 100)
    assert plan_health([stalled, PodHealth("b", is_terminating=True)], NOW) is None  # a replacement is under way
    assert plan_health([stalled], NOW, last_deletion=NOW - 10, num_recent=1) is None
    assert plan_health([stalled], NOW, last_deletion=NOW - backoff_seconds(1), num_recent=1) is not None
    assert backoff_seconds(2) == 2 * backoff_seconds(1)
    assert plan_health([stalled], NOW, last_deletion=NOW - backoff_seconds(1), num_recent=2) is None


def test_never_the_last_ready_pod_while_others_are_starting():
    wedged = PodHealth("a", unresponsive_since=NOW - 60)
    starting = PodHealth("b", is_ready=False, is_started=False)
    assert plan_health([wedged, starting], NOW) is None
    assert plan_health([wedged, starting, PodHealth("c")], NOW).pod == "a"
    assert plan_health([wedged], NOW).pod == "a"  # alone it serves nothing anyway


def test_stalled_since_needs_waiting_requests_and_no_progress():
    def s(t, waiting, tokens):
        return WorkerSample(time=t, waiting=waiting, generation_tokens=tokens)
    assert stalled_since([s(0, 2, 10), s(2, 2, 12), s(4, 3, 12), s(6, 3, 12)]) == 2
    assert stalled_since([s(0, 2, 10), s(2, 2, 12), s(4, 0, 12)]) is None  # nothing waits
    assert stalled_since([s(0, 2, 10), s(2, 2, 12)]) == 2
    assert stalled_since([s(0, 0, 10), s(2, 2, 10), s(4, 2, 10)]) == 2
    prefill = [WorkerSample(time=0, waiting=1, prompt_tokens=10), WorkerSample(time=2, waiting=1, prompt_tokens=90)]
    assert stalled_since(prefill) == 2  # a long prefill is progress


def test_leadership_follows_kopfs_peering_rule():
    now = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)

    def peer(priority, age=1, lifetime=30):
        return {"priority": priority, "lifetime": lifetime, "lastseen": (now - datetime.timedelta(seconds=age)).isoformat()}
    assert is_active({}, 5, now)
    assert is_active({"me": peer(5), "low": peer(3)}, 5, now)
    assert not is_active({"me": peer(5), "high": peer(9)}, 5, now)
    assert is_active({"me": peer(5), "dead-high": peer(9, age=60)}, 5, now)
    assert not is_active({"me": peer(5), "twin": peer(5)}, 5, now)
