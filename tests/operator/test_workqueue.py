"""The status queue: coalescing, no overlapping runs per key, retries."""

import asyncio

import pytest

from infergrid.operator.workqueue import WorkQueue


@pytest.mark.asyncio
async def test_a_burst_of_requests_runs_the_action_once():
    calls = []

    async def action(key):
        calls.append(key)

    queue = WorkQueue(action, name="t", delay=0.05)
    for _ in range(50):
        queue.request("a")
    queue.request("b")
    await asyncio.sleep(0.2)
    assert sorted(calls) == ["a", "b"]
    await queue.close()


@pytest.mark.asyncio
async def test_runs_for_one_key_never_overlap_and_the_last_request_is_honoured():
    running, max_running, calls = 0, 0, 0
    release = asyncio.Event()

    async def action(key):
        nonlocal running, max_running, calls
        running += 1
        max_running = max(max_running, running)
        calls += 1
        if calls == 1:
            await release.wait()
        running -= 1

    queue = WorkQueue(action, name="t", delay=0.01)
    queue.request("k")
    await asyncio.sleep(0.05)  # first run is now blocked inside the action
    queue.request("k")
    queue.request("k")
    await asyncio.sleep(0.05)
    assert calls == 1  # the new request waits for the running one
    release.set()
    await asyncio.sleep(0.1)
    assert calls == 2 and max_running == 1
    await queue.close()


@pytest.mark.asyncio
async def test_failures_are_retried():
    attempts = []

    async def action(key):
        attempts.append(key)
        if len(attempts) < 3:
            raise RuntimeError("API down")

    queue = WorkQueue(action, name="t", delay=0.01, retry_delay=0.02)
    queue.request("k")
    await asyncio.sleep(0.3)
    assert len(attempts) == 3
    assert queue.num_pending == 0
    await queue.close()


@pytest.mark.asyncio
async def test_retry_delay_doubles_and_every_failure_is_reported():
    stamps, reported = [], []

    async def action(key):
        stamps.append(asyncio.get_running_loop().time())
        if len(stamps) < 4:
            raise RuntimeError(f"failure {len(stamps)}")

    queue = WorkQueue(action, name="t", delay=0.0, retry_delay=0.05, max_retry_delay=0.1,
                      on_error=lambda key, exc, failures: reported.append((key, str(exc), failures)))
    queue.request("k")
    await asyncio.sleep(0.6)
    assert [r[2] for r in reported] == [1, 2, 3]
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert len(stamps) == 4
    assert gaps[0] >= 0.045 and gaps[1] >= 0.095 and gaps[2] < 0.2  # 0.05, 0.1, capped at 0.1
    await queue.close()


@pytest.mark.asyncio
async def test_an_earlier_request_overtakes_a_pending_retry():
    calls = []

    async def action(key):
        calls.append(asyncio.get_running_loop().time())
        if len(calls) == 1:
            raise RuntimeError("first attempt fails")

    queue = WorkQueue(action, name="t", delay=0.0, retry_delay=5.0)
    queue.request("k")
    await asyncio.sleep(0.05)  # failed; a retry is due in 5 s
    queue.request("k")  # e.g. the spec was fixed: run now
    await asyncio.sleep(0.05)
    assert len(calls) == 2 and calls[1] - calls[0] < 1.0
    await queue.close()
