"""Pure pieces of the router: the health state machine, the API-key file, the holding queue."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from infergrid.router.auth import KeyFile
from infergrid.router.health import Failure, HealthState, WorkerHealth
from infergrid.router.holding import HoldingQueue, HoldRejected
from infergrid.router.retry_budget import RetryBudget


def test_health_new_worker_needs_a_good_probe() -> None:
    h = WorkerHealth()
    assert not h.is_admitted
    assert h.on_failure(Failure.CONNECT, 0.0) is False and h.state is HealthState.NEW
    assert h.on_probe_ok() is True and h.is_admitted


@pytest.mark.parametrize("failure", list(Failure))
def test_health_any_failure_ejects_and_a_good_probe_readmits(failure: Failure) -> None:
    h = WorkerHealth()
    h.on_probe_ok()
    assert h.on_failure(failure, 0.0) is True and h.state is HealthState.EJECTED and h.last_failure is failure
    assert h.on_failure(failure, 0.0) is False  # already out: no second ejection
    assert h.on_probe_ok() is True and h.is_admitted and h.num_failures == 0
    assert h.on_probe_ok() is False


def test_only_a_silent_stretch_wedges_a_worker_once() -> None:
    h = WorkerHealth()
    h.on_probe_ok()
    h.on_failure(Failure.TIMEOUT, 10.0)
    assert not h.becomes_wedged(12.9, 3.0)
    h.on_failure(Failure.TIMEOUT, 11.0)
    assert h.becomes_wedged(13.0, 3.0) and not h.becomes_wedged(14.0, 3.0)  # once per stretch
    h.on_probe_ok()
    h.on_failure(Failure.TIMEOUT, 20.0)
    h.on_failure(Failure.NOT_READY, 21.0)  # it answers (draining): not wedged, its requests finish
    assert not h.becomes_wedged(30.0, 3.0)
    h.on_failure(Failure.TIMEOUT, 31.0)
    assert not h.becomes_wedged(33.0, 3.0) and h.becomes_wedged(34.0, 3.0)


def test_key_file_checks_rotates_and_refuses_when_missing(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# comment\nsk-one\n\n  sk-two  \n")
    keys = KeyFile(path)
    assert keys.check("Bearer sk-one") and keys.check("Bearer sk-two")
    assert not keys.check("Bearer sk-three") and not keys.check(None) and not keys.check("sk-one")
    assert not keys.check("Basic sk-one") and not keys.check("Bearer ")
    path.write_text("sk-three\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on a coarse clock
    assert keys.check("Bearer sk-three") and not keys.check("Bearer sk-one")
    path.unlink()
    assert not keys.check("Bearer sk-three")


def test_key_file_never_logs_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys"
    path.write_text("sk-secret-value\n")
    with caplog.at_level("DEBUG"):
        KeyFile(path).check("Bearer wrong-guess")
    assert "sk-secret-value" not in caplog.text and "wrong-guess" not in caplog.text


@pytest.mark.asyncio
async def test_holding_releases_in_order_and_counts() -> None:
    counts: list[int] = []
    q = HoldingQueue(max_held=3, timeout=5.0, on_change=counts.append)
    waiters = [asyncio.create_task(q.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert q.num_held == 3
    with pytest.raises(HoldRejected) as full:
        await q.wait()
    assert full.value.reason == "full"
    q.release_all()
    await asyncio.gather(*waiters)
    assert q.num_held == 0 and counts[-1] == 0 and max(counts) == 3


@pytest.mark.asyncio
async def test_holding_times_out_promptly() -> None:
    q = HoldingQueue(max_held=2, timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(HoldRejected) as exc:
        await q.wait()
    assert exc.value.reason == "timeout" and 0.19 <= time.monotonic() - t0 < 1.0
    assert q.num_held == 0


def test_retry_budget_caps_retries_to_a_fraction() -> None:
    budget = RetryBudget(ratio=0.2, reserve=10)
    retries = 0
    for _ in range(1000):
        budget.on_request()
        retries += budget.try_withdraw()
    assert retries <= 0.2 * 1000 + 10
