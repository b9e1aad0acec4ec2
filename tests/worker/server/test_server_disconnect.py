"""Clients that leave mid-request: their engine requests are aborted and their KV blocks freed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import httpx
from server_harness import MODEL_NAME, WorkerServer

NUM_STREAMS = 20
RECOVERY_LIMIT_S = 2.0


def wait_for_baseline(server: WorkerServer, used_blocks: float, limit_s: float) -> float:
    """Seconds until nothing runs or waits and the used KV blocks are back to `used_blocks`."""
    start = time.monotonic()
    while True:
        m = server.metrics()
        running = m[("vllm:num_requests_running", ())]
        waiting = m[("vllm:num_requests_waiting", ())]
        used = m[("infergrid:kv_cache_used_blocks", ())]
        in_flight = m[("infergrid:num_requests_in_flight", ())]
        elapsed = time.monotonic() - start
        if running == 0 and waiting == 0 and used == used_blocks and in_flight == 0:
            return elapsed
        if elapsed > limit_s:
            raise AssertionError(f"after {elapsed:.2f}s: running={running} waiting={waiting} used_blocks={used} "
                                 f"(baseline {used_blocks}) in_flight={in_flight}")
        time.sleep(0.05)


def test_cut_streams_free_their_slots_and_blocks(server: WorkerServer) -> None:
    base_used = server.metric("infergrid:kv_cache_used_blocks")
    base_aborts = server.metric("infergrid:client_disconnects_total")
    peak = {"running": 0.0, "used": 0.0}
    seen_running = asyncio.Event()  # set by the watcher once it has seen >= 2 requests running

    async def one(i: int, client: httpx.AsyncClient) -> int:
        body = {"model": MODEL_NAME, "prompt": f"Stream number {i} tells a long story", "max_tokens": 200,
                "ignore_eos": True, "stream": True, "temperature": 0}
        received = 0
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    received += 1
                    if received >= 3:
                        # Leave mid-stream (closing the response drops the connection), but only once
                        # the watcher has seen the streams running, so the check below is not a race.
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(seen_running.wait(), timeout=10)
                        break
        return received

    async def watch(stop: asyncio.Event) -> None:
        while not stop.is_set():
            m = await asyncio.to_thread(server.metrics)
            peak["running"] = max(peak["running"], m[("vllm:num_requests_running", ())])
            peak["used"] = max(peak["used"], m[("infergrid:kv_cache_used_blocks", ())])
            if peak["running"] >= 2 and peak["used"] > base_used:
                seen_running.set()
            await asyncio.sleep(0.05)

    async def main() -> list[int]:
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        async with server.async_client(limits=httpx.Limits(max_connections=NUM_STREAMS)) as client:
            got = await asyncio.gather(*(one(i, client) for i in range(NUM_STREAMS)))
        stop.set()
        await watcher
        return got

    received = asyncio.run(main())
    cut_at = time.monotonic()
    assert all(r == 3 for r in received)
    assert peak["running"] >= 2 and peak["used"] > base_used  # they really were running when cut
    elapsed = wait_for_baseline(server, base_used, RECOVERY_LIMIT_S)
    print(f"{NUM_STREAMS} cut streams: back to baseline {elapsed:.3f}s after the last cut "
          f"(peak running {peak['running']:.0f}, peak used blocks {peak['used']:.0f})")
    assert time.monotonic() - cut_at <= RECOVERY_LIMIT_S + 0.5
    assert server.metric("infergrid:client_disconnects_total") - base_aborts == NUM_STREAMS


def test_non_streaming_client_disconnect_aborts(server: WorkerServer) -> None:
    base_used = server.metric("infergrid:kv_cache_used_blocks")
    base_aborts = server.metric("infergrid:client_disconnects_total")
    body = json.dumps({"model": MODEL_NAME, "prompt": "A very long answer please", "max_tokens": 230,
                       "ignore_eos": True}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Authorization: Bearer {server.api_key}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    socks = []
    for _ in range(4):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(request)
        socks.append(s)
    deadline = time.monotonic() + 10
    while server.metric("vllm:num_requests_running") < 4:
        assert time.monotonic() < deadline, "requests never started"
        time.sleep(0.02)
    for s in socks:
        s.close()
    elapsed = wait_for_baseline(server, base_used, RECOVERY_LIMIT_S)
    print(f"4 non-streaming disconnects: back to baseline in {elapsed:.3f}s")
    assert server.metric("infergrid:client_disconnects_total") - base_aborts == 4
