"""SIGTERM: readiness fails and new requests get 503 at once, in-flight requests finish, exit code 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable

import httpx
from server_harness import MODEL_NAME, WorkerServer

NUM_IN_FLIGHT = 10
MAX_TOKENS = 500


def test_sigterm_drains_in_flight_requests(start_worker: Callable[..., WorkerServer]) -> None:
    server = start_worker("--drain-timeout", "60", "--num-gpu-blocks-override", "400", "--max-model-len", "1024",
                          name="drain")
    during: dict[str, object] = {}
    finished_at: list[float] = []

    async def plain(client: httpx.AsyncClient, i: int) -> tuple[int, int]:
        resp = await client.post("/v1/completions", json={
            "model": MODEL_NAME, "prompt": f"Drain test {i}", "max_tokens": MAX_TOKENS, "ignore_eos": True})
        finished_at.append(time.monotonic())
        return resp.status_code, resp.json()["usage"]["completion_tokens"] if resp.status_code == 200 else -1

    async def streamed(client: httpx.AsyncClient, i: int) -> tuple[int, int]:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"Drain {i}"}],
                "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        tokens, done = -1, False
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        tokens = usage["completion_tokens"]
        finished_at.append(time.monotonic())
        return (resp.status_code if done else -1), tokens

    async def probe_after_sigterm(client: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + 10
        while server.metric("infergrid:num_requests_in_flight") < NUM_IN_FLIGHT:
            assert time.monotonic() < deadline, "requests never got in flight"
            await asyncio.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        during["sigterm_at"] = time.monotonic()
        await asyncio.sleep(0.05)
        during["in_flight"] = server.metric("infergrid:num_requests_in_flight")
        during["draining"] = server.metric("infergrid:draining")
        during["ready"] = (await client.get("/ready")).status_code
        during["health"] = (await client.get("/health")).status_code
        start = time.monotonic()
        new = await client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "late", "max_tokens": 2})
        during["new_latency_s"] = time.monotonic() - start
        during["new"] = (new.status_code, new.headers.get("retry-after"), new.json()["error"]["code"])

    async def main() -> list[tuple[int, int]]:
        async with server.async_client(limits=httpx.Limits(max_connections=32), timeout=120.0) as client:
            work = [plain(client, i) if i % 2 else streamed(client, i) for i in range(NUM_IN_FLIGHT)]
            results = await asyncio.gather(*work, probe_after_sigterm(client))
        return results[:-1]

    results = asyncio.run(main())
    assert results == [(200, MAX_TOKENS)] * NUM_IN_FLIGHT, results
    assert min(finished_at) > during["sigterm_at"]  # all 10 were in flight when SIGTERM came
    assert during["ready"] == 503
    assert during["health"] == 200  # still alive while draining
    assert during["new"] == (503, "1", "draining"), during
    assert during["new_latency_s"] < 0.5
    assert during["in_flight"] > 0 and during["draining"] == 1  # the probe ran while requests were draining
    assert server.proc.wait(30) == 0, server.log_tail()


def test_drain_timeout_aborts_what_is_left(start_worker: Callable[..., WorkerServer]) -> None:
    """--drain-timeout 0.3 with requests needing far longer: streams end with finish_reason "abort"
    and [DONE], plain requests get 503 drain_timeout, and the process still exits 0 promptly."""
    server = start_worker("--drain-timeout", "0.3", "--max-model-len", "1024", name="drain-timeout")
    body = {"model": MODEL_NAME, "prompt": "endless", "max_tokens": 1000, "ignore_eos": True}

    async def streamed(client: httpx.AsyncClient) -> tuple[str | None, bool]:
        finish, done = None, False
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    choices = json.loads(line[6:])["choices"]
                    finish = (choices[0]["finish_reason"] if choices else None) or finish
        return finish, done

    async def plain(client: httpx.AsyncClient) -> tuple[int, str]:
        resp = await client.post("/v1/completions", json=body)
        return resp.status_code, resp.json().get("error", {}).get("code", "")

    async def main() -> tuple[list, list, float]:
        async with server.async_client(timeout=60.0) as client:
            streams = [asyncio.create_task(streamed(client)) for _ in range(3)]
            plains = [asyncio.create_task(plain(client)) for _ in range(3)]
            while server.metric("vllm:num_requests_running") < 6:
                await asyncio.sleep(0.01)
            start = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            stream_results = await asyncio.gather(*streams)
            plain_results = await asyncio.gather(*plains)
            return stream_results, plain_results, time.monotonic() - start

    stream_results, plain_results, cut_after = asyncio.run(main())
    assert stream_results == [("abort", True)] * 3
    assert plain_results == [(503, "drain_timeout")] * 3
    assert 0.25 <= cut_after < 4.0
    assert server.proc.wait(30) == 0, server.log_tail()
