"""Worker faults under load, real processes: SIGKILL (0 failed requests that had not reached the dead
worker; ejected <= 2 s), SIGSTOP (ejected; its in-flight requests end with a clear 504 once the worker
has been silent for --wedged-after; SIGCONT re-admits it), zero ready workers (held request completes when a worker
starts; queue full / hold timeout -> 503 + Retry-After promptly)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from router_harness import Router, Worker, free_port

from infergrid.testbed.load import EndpointLoad

WEDGED_AFTER = 3.0
TEARDOWN_S = 0.5


@pytest.fixture(scope="module")
def workers(start_workers: Callable[..., list[Worker]]) -> list[Worker]:
    return start_workers(3)


@pytest.fixture(scope="module")
def router(workers: list[Worker], log_dir: Path) -> Iterator[Router]:
    r = Router(log_dir, [w.address for w in workers], "--policy", "least-load",
               "--wedged-after", str(WEDGED_AFTER), name="faults")
    r.wait_ready_workers(3)
    yield r
    r.stop()


def small_requests(url: str, concurrency: int = 4, max_tokens: int = 8) -> EndpointLoad:
    """Small completions against the router until the `with` block ends."""
    return EndpointLoad(url + "/v1/completions", {"prompt": "Hello there", "max_tokens": max_tokens,
                                                  "ignore_eos": True}, concurrency)


def test_sigkill_one_worker_under_load(router: Router, workers: list[Worker],
                                       start_workers: Callable[..., list[Worker]]) -> None:
    victim = workers[0]
    with small_requests(router.url) as load:
        time.sleep(2.0)
        killed_at = time.monotonic()
        victim.signal(signal.SIGKILL)
        ejected_after = router.wait_ready_workers(2, timeout=10)
        time.sleep(2.0)
    assert ejected_after <= 2.0, ejected_after
    ok = [r for r in load.results if r[2] == 200]
    failed = [r for r in load.results if r[2] != 200]
    assert len(ok) >= 20
    # Only requests that had reached the worker may fail: those in flight at the kill, or sent to its
    # socket while the killed process was still being torn down (it holds its sockets until it is gone;
    # TEARDOWN_S bounds that on a loaded machine). At most one per client thread.
    assert len(failed) <= 4, failed
    assert all(start < killed_at + TEARDOWN_S for start, *_ in failed), failed
    assert all("upstream_error" in body for *_, body in failed), failed
    # every request sent after that succeeded on the survivors: connect failures were retried
    assert all(r[2] == 200 for r in load.results if r[0] > killed_at + TEARDOWN_S)


def test_sigstop_worker_is_ejected_its_requests_end_with_504_and_sigcont_readmits(
        router: Router, workers: list[Worker]) -> None:
    victim = workers[1]
    assert router.metric("infergrid:router_ready_workers") == 2  # after the SIGKILL test
    # Requests long enough that some are in flight on the victim when it stops. The upstream timeout
    # stays at its default (600 s): what ends them is the router seeing the worker silent.
    with small_requests(router.url, concurrency=4, max_tokens=48) as load:
        time.sleep(1.5)
        stopped_at = time.monotonic()
        victim.signal(signal.SIGSTOP)
        try:
            ejected_after = router.wait_ready_workers(1, timeout=10)
            time.sleep(WEDGED_AFTER + 4.5)
        finally:
            victim.signal(signal.SIGCONT)
        continued_at = time.monotonic()
        readmitted_after = router.wait_ready_workers(2, timeout=10)
        time.sleep(0.5)
    assert ejected_after <= 2.0, ejected_after
    assert readmitted_after <= 3.0, readmitted_after
    timeouts = [r for r in load.results if r[2] == 504]
    assert timeouts, "no request was in flight on the stopped worker"
    for start, end, _, body in timeouts:
        assert "worker_unresponsive" in body and "answered nothing" in body and '"error"' in body
        # the first timed-out probe ends 0.8-1.8 s after the stop (1 s interval, 0.8 s timeout), the
        # stretch must last WEDGED_AFTER, and the probe that sees it ends up to 1 s later: <= 5.8 s, plus
        # 1 s for a loaded CI machine
        assert end - max(start, stopped_at) <= WEDGED_AFTER + 3.8, (end - stopped_at)
        assert end < continued_at  # not by the SIGCONT
    others = [r for r in load.results if r[2] not in (200, 504)]
    assert not others, others
    assert router.metric("infergrid:router_ejections_total", worker=victim.address) >= 1


def test_zero_workers_holds_until_a_worker_is_ready(log_dir: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    router = Router(log_dir, [f"127.0.0.1:{port}"], "--hold-timeout", "240", name="zero")
    worker: Worker | None = None
    try:
        assert router.metric("infergrid:router_ready_workers") == 0
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(httpx.post, router.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                               timeout=300)
            deadline = time.monotonic() + 10
            while router.metric("infergrid:router_held_requests") != 1:
                assert time.monotonic() < deadline, "request not held"
                time.sleep(0.05)
            worker = Worker(tiny_model_dir, log_dir, port)
            response = held.result(timeout=280)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 2
        assert router.metric("infergrid:router_held_requests") == 0
    finally:
        router.stop()
        if worker is not None:
            worker.stop()


def test_queue_full_and_hold_timeout_answer_503_with_retry_after(log_dir: Path) -> None:
    router = Router(log_dir, [f"127.0.0.1:{free_port()}"], "--max-held", "1", "--hold-timeout", "1", name="full")
    try:
        def post() -> tuple[httpx.Response, float]:
            t0 = time.monotonic()
            r = httpx.post(router.url + "/v1/chat/completions", timeout=30,
                           json={"messages": [{"role": "user", "content": "Hi"}]})
            return r, time.monotonic() - t0

        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post)
            deadline = time.monotonic() + 5
            while router.metric("infergrid:router_held_requests") != 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            full, full_s = post()
            timed_out, timed_out_s = first.result()
        for r in (full, timed_out):
            assert r.status_code == 503 and r.headers["retry-after"].isdigit(), r.text
            assert r.json()["error"]["code"] == "no_ready_worker"
        assert "already waiting" in full.json()["error"]["message"]
        assert "within 1 s" in timed_out.json()["error"]["message"]
        # Full: answered at once; timeout: at the deadline (1 s) plus the router's 100 ms, with a margin
        # for the client's own round trip on a loaded machine.
        assert full_s < 0.5, full_s
        assert 1.0 <= timed_out_s < 2.0, timed_out_s
        assert router.metric("infergrid:router_requests_total", outcome="held_full") == 1
        assert router.metric("infergrid:router_requests_total", outcome="held_timeout") == 1
    finally:
        router.stop()
