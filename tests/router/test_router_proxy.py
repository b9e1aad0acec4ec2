"""The router in front of 3 real workers, through the official `openai` client: completions and chat,
streaming and not, API keys (401s, rotation), X-Request-Id, body limit, prefix-aware affinity and the
prefix-cache hit rate against round-robin (read from the workers' vllm:prefix_cache_* counters)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from router_harness import MODEL_NAME, Router, Worker

from infergrid.testbed.load import tenant_system_prompts

KEY = "sk-router-test"


@pytest.fixture(scope="module")
def workers(start_workers: Callable[..., list[Worker]]) -> list[Worker]:
    # A small KV pool (72 blocks of 16 tokens per worker): a worker holds the prefixes of ~5 tenants only.
    return start_workers(3, "--num-gpu-blocks-override", "72", "--max-num-seqs", "8")


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys"
    path.write_text(f"{KEY}\n")
    return path


@pytest.fixture(scope="module")
def router(workers: list[Worker], key_file: Path, log_dir: Path) -> Iterator[Router]:
    r = Router(log_dir, [w.address for w in workers], "--api-key-file", str(key_file), "--max-body-bytes", "100000")
    r.wait_ready_workers(3)
    yield r
    r.stop()


def client(router: Router, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_client_completions_and_chat(router: Router) -> None:
    c = client(router)
    done = c.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 4 and done.choices[0].finish_reason == "length"
    chunks = list(c.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, stream=True,
                                       extra_body={"ignore_eos": True}))
    assert len(chunks) >= 4 and chunks[-1].choices[0].finish_reason == "length"
    chat = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                     extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 3
    stream = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    events = list(stream)
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 3
    assert [m.id for m in c.models.list().data] == [MODEL_NAME]


def test_stream_arrives_incrementally(router: Router) -> None:
    """SSE events reach the client as the worker sends them, not all at the end."""
    arrivals = []
    with httpx.stream("POST", router.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "Hello", "max_tokens": 40, "stream": True, "ignore_eos": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
    assert len(arrivals) >= 40
    assert arrivals[-1] - arrivals[0] > 0.01  # spread over the generation, not one burst


def test_seed_api_and_request_id_pass_through(router: Router) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "X-Request-Id": "rid-123"}
    r = httpx.post(router.url + "/v1/generate", headers=headers, json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "rid-123", r.text
    r = httpx.get(router.url + "/v1/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32  # generated when absent
    assert httpx.get(router.url + "/v1/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_vllm_router_fields_pass(router: Router) -> None:
    r = httpx.post(router.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"prompt": "Hi", "max_tokens": 1, "no_stop_trim": True, "return_hidden_states": False,
                         "separate_reasoning": True})
    assert r.status_code == 200 and r.headers["x-ignored-fields"] == \
        "no_stop_trim,return_hidden_states,separate_reasoning"


def test_missing_or_wrong_key_is_401_and_keys_rotate(router: Router, key_file: Path) -> None:
    for key in ("sk-wrong", "Bearer"):
        with pytest.raises(openai.AuthenticationError) as exc:
            client(router, key).completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=1)
        assert exc.value.status_code == 401 and exc.value.body["code"] == "invalid_api_key"
    r = httpx.post(router.url + "/v1/completions", json={"prompt": "Hi"}, timeout=10)
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    key_file.write_text(f"{KEY}\nsk-rotated\n")
    os.utime(key_file, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert client(router, "sk-rotated").completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=1).choices
    assert "sk-rotated" not in router.log_tail(100_000) and KEY not in router.log_tail(100_000)
    # the router's own endpoints need no key
    assert httpx.get(router.url + "/metrics").status_code == 200 and httpx.get(router.url + "/health").status_code == 200


def test_body_over_limit_is_413_openai_json(router: Router) -> None:
    r = httpx.post(router.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=10,
                   json={"prompt": "x" * 200_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def hit_rate(workers: list[Worker], before: list[tuple[float, float]]) -> float:
    hits = sum(w.counter("vllm:prefix_cache_hits_total") - b[0] for w, b in zip(workers, before, strict=True))
    queries = sum(w.counter("vllm:prefix_cache_queries_total") - b[1] for w, b in zip(workers, before, strict=True))
    return hits / queries


def run_workload(router: Router, workers: list[Worker], salt: str) -> float:
    """200 chat requests, one at a time: 80% cycle through 7 tenants' system prompts (~200 tokens each),
    20% are unique. All 7 prefixes (~91 blocks) do not fit one worker's 72-block pool, the 2-3 a worker
    owns under prefix-aware routing do; round-robin shows every worker every tenant in turn, the LRU
    pool's worst case. Returns the cluster's prefix-cache hit rate (workers' vllm:prefix_cache_* counters)."""
    systems = tenant_system_prompts(salt)
    before = [(w.counter("vllm:prefix_cache_hits_total"), w.counter("vllm:prefix_cache_queries_total"))
              for w in workers]
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        for i, system in enumerate(systems):
            r = c.post(router.url + "/v1/chat/completions",
                       json={"messages": [{"role": "system", "content": system},
                                          {"role": "user", "content": f"question {i}"}], "max_tokens": 1})
            assert r.status_code == 200, r.text
    return hit_rate(workers, before)


def served_counts(router: Router, workers: list[Worker]) -> dict[str, float]:
    return {w.address: router.metric("infergrid:router_requests_total", worker=w.address) for w in workers}


def test_prefix_aware_keeps_a_shared_prompt_on_one_worker_and_doubles_hit_rate(
        workers: list[Worker], router: Router, log_dir: Path) -> None:
    # One long shared system prompt + 20% unique: >= 90% of the shared ones on one worker.
    shared = "You are the shared assistant. Answer briefly and exactly. " * 8
    before = served_counts(router, workers)

    def ask(i: int) -> None:
        system = shared if i % 5 else f"[{uuid.uuid4()}] unique " * 3
        r = httpx.post(router.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                       json={"messages": [{"role": "system", "content": system},
                                          {"role": "user", "content": f"q{i}"}], "max_tokens": 1})
        assert r.status_code == 200, r.text

    # Unique requests first, alone, so the per-worker request counters isolate the shared ones afterwards.
    for i in range(0, 200, 5):
        ask(i)
    mid = served_counts(router, workers)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(ask, [i for i in range(200) if i % 5]))
    after = served_counts(router, workers)
    shared_counts = sorted(after[a] - mid[a] for a in after)
    assert sum(shared_counts) == 160 and sum(mid[a] - before[a] for a in mid) == 40
    assert shared_counts[-1] >= 0.9 * 160, shared_counts

    # Hit rate: 7 tenants' prompts on 3 workers whose KV pools hold only a few each.
    pa_rate = run_workload(router, workers, "pa")
    rr = Router(log_dir, [w.address for w in workers], "--policy", "round-robin", name="rr")
    try:
        rr.wait_ready_workers(3)
        rr_rate = run_workload(rr, workers, "rr")
    finally:
        rr.stop()
    print(f"prefix-cache hit rate: prefix-aware {pa_rate:.3f}, round-robin {rr_rate:.3f}")
    assert pa_rate >= 2 * rr_rate, (pa_rate, rr_rate)


def test_client_disconnect_aborts_the_request_on_the_worker(router: Router, workers: list[Worker]) -> None:
    """A client that leaves mid-stream: the router closes the upstream connection, the worker aborts the
    request (running drops to 0 long before the 900 tokens would have been generated)."""
    def running() -> float:
        return sum(w.counter("vllm:num_requests_running") for w in workers)

    assert running() == 0
    with httpx.stream("POST", router.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "Hi", "max_tokens": 900, "stream": True, "ignore_eos": True}, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert running() == 1
        left_at = time.monotonic()
    while running() != 0:
        assert time.monotonic() - left_at < 3.0, "the worker kept generating for a client that left"
        time.sleep(0.05)
    assert router.metric("infergrid:router_requests_total", outcome="client_disconnect") >= 1
