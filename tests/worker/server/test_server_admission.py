"""Bounded admission: 3x the queue limit at once; the excess is refused fast with 429 + Retry-After,
no connection hangs, and the accepted requests complete."""

from __future__ import annotations

import asyncio
import time

import httpx
from server_harness import MODEL_NAME, WorkerServer

QUEUE_LIMIT = 4  # small_server's --max-queue-size
REFUSAL_LIMIT_S = 0.100


def test_three_times_the_queue_limit(small_server: WorkerServer) -> None:
    base_rejected = small_server.metric("infergrid:admission_rejected_total", reason="queue_full")
    total = 3 * QUEUE_LIMIT

    async def one(client: httpx.AsyncClient, i: int, go: asyncio.Event) -> tuple[int, float, dict, dict]:
        await go.wait()
        start = time.monotonic()
        resp = await client.post("/v1/completions", json={
            "model": MODEL_NAME, "prompt": f"Request {i}", "max_tokens": 60, "ignore_eos": True})
        return resp.status_code, time.monotonic() - start, dict(resp.headers), resp.json()

    async def main() -> list[tuple[int, float, dict, dict]]:
        limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
        async with small_server.async_client(limits=limits, timeout=120.0) as client:
            # Open every connection first so the burst measures admission, not TCP handshakes.
            await asyncio.gather(*(client.get("/v1/models") for _ in range(total)))
            go = asyncio.Event()
            tasks = [asyncio.create_task(one(client, i, go)) for i in range(total)]
            await asyncio.sleep(0.05)
            go.set()
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)  # no hung connection

    results = asyncio.run(main())
    accepted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert len(accepted) + len(refused) == total
    assert len(accepted) >= QUEUE_LIMIT  # the first QUEUE_LIMIT always fit (more may if some finished)
    assert len(refused) >= total - 2 * QUEUE_LIMIT
    for status, elapsed, headers, body in refused:
        assert status == 429
        assert headers.get("retry-after") == "1"
        assert body["error"]["code"] == "queue_full"
        assert elapsed < REFUSAL_LIMIT_S, f"refusal took {elapsed * 1000:.1f} ms"
    for _, _, _, body in accepted:
        assert body["usage"]["completion_tokens"] == 60
    slowest = max(r[1] for r in refused)
    print(f"{total} at once: {len(accepted)} accepted, {len(refused)} refused; slowest refusal "
          f"{slowest * 1000:.1f} ms, mean {sum(r[1] for r in refused) / len(refused) * 1000:.1f} ms")
    rejected = small_server.metric("infergrid:admission_rejected_total", reason="queue_full") - base_rejected
    assert rejected == len(refused)
    assert small_server.metric("infergrid:num_requests_in_flight") == 0
