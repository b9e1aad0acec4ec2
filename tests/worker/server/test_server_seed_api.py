"""The seed API: /v1/generate (prompt or token ids, priority, deadline_ms), /v1/batch, /v1/health,
/v1/metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest
from server_harness import MODEL_NAME, WorkerServer


def test_generate_from_text_and_from_token_ids(server: WorkerServer) -> None:
    with server.client() as http:
        by_text = http.post("/v1/generate", json={"prompt": "Hello there", "max_tokens": 6, "temperature": 0,
                                                  "ignore_eos": True, "logprobs": 1}).json()
        by_ids = http.post("/v1/generate", json={"prompt_token_ids": [3, 50, 60, 70], "max_tokens": 4,
                                                 "temperature": 0, "ignore_eos": True}).json()
        same = http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 6, "temperature": 0,
                                                  "ignore_eos": True}).json()
    assert by_text["model"] == MODEL_NAME and by_text["finish_reason"] == "length"
    assert by_text["completion_tokens"] == len(by_text["token_ids"]) == 6
    assert len(by_text["logprobs"]) == 6 and all(lp <= 0 for lp in by_text["logprobs"])
    assert 0 < by_text["ttft_ms"] <= by_text["latency_ms"]
    assert by_text["text"] == same["choices"][0]["text"]  # same engine, same greedy answer
    assert by_ids["prompt_tokens"] == 4 and by_ids["completion_tokens"] == 4


def test_batch_answers_in_order(server: WorkerServer) -> None:
    items = [{"prompt": "one", "max_tokens": 2, "ignore_eos": True},
             {"prompt_token_ids": [7, 8, 9], "max_tokens": 5, "ignore_eos": True},
             {"prompt": "three", "max_tokens": 3, "ignore_eos": True, "priority": -1}]
    with server.client() as http:
        resp = http.post("/v1/batch", json={"requests": items})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [r["completion_tokens"] for r in body["responses"]] == [2, 5, 3]
    assert body["responses"][1]["prompt_tokens"] == 3
    assert body["total_completion_tokens"] == 10
    assert body["throughput_tokens_per_s"] > 0 and body["total_latency_ms"] > 0


def test_health_and_metrics_json(server: WorkerServer) -> None:
    with server.client() as http:
        http.post("/v1/generate", json={"prompt": "warm", "max_tokens": 3})
        health = http.get("/v1/health")
        summary = http.get("/v1/metrics").json()
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["ready"] is True
    assert summary["model"] == MODEL_NAME and summary["state"] == "ready"
    engine = summary["engine"]
    for key in ("num_running", "num_waiting", "kv_cache_usage", "num_total_blocks", "prompt_tokens_total",
                "generation_tokens_total", "prefix_cache_hit_rate", "num_steps_total"):
        assert key in engine, key
    assert engine["generation_tokens_total"] >= 3
    assert summary["admission"]["max_queue_size"] == 64
    assert summary["latency_s"]["ttft"]["count"] >= 1 and summary["latency_s"]["ttft"]["p50"] > 0
    assert summary["requests_finished"].get("length", 0) >= 1


@pytest.fixture(scope="module")
def one_seq_server(start_worker: Callable[..., WorkerServer]) -> WorkerServer:
    """One sequence at a time, so the waiting queue's order (priority, deadline) is visible."""
    return start_worker("--max-num-seqs", "1", "--num-gpu-blocks-override", "200", "--max-model-len", "1024",
                        name="one-seq")


def test_priority_orders_the_waiting_queue(one_seq_server: WorkerServer) -> None:
    srv = one_seq_server

    async def main() -> dict[str, float]:
        done: dict[str, float] = {}
        async with srv.async_client(timeout=60.0) as client:
            async def run(name: str, priority: int, max_tokens: int) -> None:
                r = await client.post("/v1/generate", json={"prompt": name, "max_tokens": max_tokens,
                                                            "ignore_eos": True, "priority": priority})
                assert r.status_code == 200, r.text
                done[name] = time.monotonic()

            blocker = asyncio.create_task(run("blocker", 0, 800))
            while srv.metric("vllm:num_requests_running") < 1:
                await asyncio.sleep(0.01)
            low = asyncio.create_task(run("low", 10, 5))
            while srv.metric("vllm:num_requests_waiting") < 1:
                await asyncio.sleep(0.01)
            high = asyncio.create_task(run("high", -10, 5))
            await asyncio.gather(blocker, low, high)
        return done

    done = asyncio.run(main())
    assert done["blocker"] < done["high"] < done["low"], done


def test_deadline_expires_a_waiting_request(one_seq_server: WorkerServer) -> None:
    srv = one_seq_server

    async def main() -> dict:
        async with srv.async_client(timeout=60.0) as client:
            blocker = asyncio.create_task(client.post("/v1/generate", json={
                "prompt": "blocker", "max_tokens": 800, "ignore_eos": True}))
            while srv.metric("vllm:num_requests_running") < 1:
                await asyncio.sleep(0.01)
            late = await client.post("/v1/generate", json={"prompt": "in a hurry", "max_tokens": 5,
                                                           "deadline_ms": 100})
            assert (await blocker).status_code == 200
            assert late.status_code == 200, late.text
            return late.json()

    late = asyncio.run(main())
    assert late["finish_reason"] == "abort" and late["stop_reason"] == "deadline"
    assert late["completion_tokens"] == 0
    assert 100 <= late["latency_ms"] < 5000


def test_seed_routes_need_the_key(server: WorkerServer) -> None:
    for method, path in (("POST", "/v1/generate"), ("POST", "/v1/batch"), ("GET", "/v1/health"),
                         ("GET", "/v1/metrics")):
        assert httpx.request(method, f"{server.url}{path}", json={}, timeout=10).status_code == 401
