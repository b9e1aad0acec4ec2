"""/metrics exports every metric SPEC.md names (label model_name) and each one moves the way the
test drives it."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from server_harness import MODEL_NAME, WorkerServer

from infergrid.worker.server.metrics import MAX_TOKEN_BUCKET, build_1_2_5_buckets

SPEC = Path(__file__).resolve().parents[4] / "shared" / "SPEC.md"  # ../shared beside the repo
SPEC_METRICS = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
    "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds", "vllm:spec_decode_num_drafts_total",
    "vllm:spec_decode_num_draft_tokens_total", "vllm:spec_decode_num_accepted_tokens_total",
]
HISTOGRAMS = ["vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds"]


def test_spec_md_names_match_this_list() -> None:
    if SPEC.is_file():  # the product spec lives beside the repo on the dev machines
        named = set(re.findall(r"`(vllm:[a-z0-9_]+)`", SPEC.read_text()))
        assert named == set(SPEC_METRICS)


def test_every_spec_metric_is_exported_with_model_name(server: WorkerServer) -> None:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in SPEC_METRICS:
        sample = f"{name}_count" if name in HISTOGRAMS else name
        assert re.search(rf'^{re.escape(sample)}\{{[^}}]*model_name="{MODEL_NAME}"', text, re.M), name
    for extra in ("infergrid:kv_cache_used_blocks", "infergrid:kv_cache_total_blocks",
                  "infergrid:admission_rejected_total", "infergrid:num_requests_in_flight", "infergrid:ready",
                  "infergrid:prefix_cache_evicted_blocks_total", "infergrid:client_disconnects_total"):
        assert re.search(rf'^{re.escape(extra)}\{{', text, re.M), extra


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after[key] - before.get(key, 0.0)


def test_token_counters_and_histograms_follow_one_request(server: WorkerServer) -> None:
    before = server.metrics()
    with server.client() as http:
        resp = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Count the tokens of this prompt",
                                                  "max_tokens": 9, "ignore_eos": True}).json()
    after = server.metrics()
    usage = resp["usage"]
    assert delta(before, after, "vllm:prompt_tokens_total") == usage["prompt_tokens"]
    assert delta(before, after, "vllm:generation_tokens_total") == usage["completion_tokens"] == 9
    assert delta(before, after, "vllm:prefix_cache_queries_total") >= usage["prompt_tokens"] - 1
    assert delta(before, after, "vllm:request_success_total", finished_reason="length") == 1
    for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_queue_time_seconds"):
        assert delta(before, after, f"{name}_count") == 1, name
        assert delta(before, after, f"{name}_sum") >= 0, name
    assert 1 <= delta(before, after, "vllm:inter_token_latency_seconds_count") <= 8
    assert delta(before, after, "vllm:inter_token_latency_seconds_sum") > 0
    assert delta(before, after, "vllm:e2e_request_latency_seconds_sum") >= \
        delta(before, after, "vllm:time_to_first_token_seconds_sum")
    assert delta(before, after, "vllm:spec_decode_num_drafts_total") == 0  # speculation is off here
    assert delta(before, after, "vllm:spec_decode_num_draft_tokens_total") == 0
    assert delta(before, after, "vllm:spec_decode_num_accepted_tokens_total") == 0


def test_finish_reasons_are_counted(server: WorkerServer) -> None:
    with server.client() as http:
        text = http.post("/v1/completions", json={"prompt": "Stop words", "max_tokens": 12, "temperature": 0,
                                                  "ignore_eos": True}).json()["choices"][0]["text"]
        before = server.metrics()
        out = http.post("/v1/completions", json={"prompt": "Stop words", "max_tokens": 12, "temperature": 0,
                                                 "ignore_eos": True, "stop": [text[3:5]]}).json()
    assert out["choices"][0]["finish_reason"] == "stop"
    after = server.metrics()
    assert delta(before, after, "vllm:request_success_total", finished_reason="stop") == 1
    assert delta(before, after, "vllm:request_success_total", finished_reason="length") == 0


def test_prefix_cache_hits_rise_on_a_repeated_prompt(server: WorkerServer) -> None:
    prompt = "The same long preamble is sent twice so that its blocks are reused by the second request. "
    with server.client() as http:
        http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
        before = server.metrics()
        http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
    after = server.metrics()
    assert delta(before, after, "vllm:prefix_cache_hits_total") >= 16
    assert delta(before, after, "vllm:prefix_cache_queries_total") >= delta(before, after,
                                                                            "vllm:prefix_cache_hits_total")


def test_load_gauges_rise_and_fall_and_preemptions_count(small_server: WorkerServer) -> None:
    """4 long requests on a 23-block pool: they run, wait, fill the KV cache and get preempted."""
    srv = small_server
    before = srv.metrics()
    peak = {"running": 0.0, "waiting": 0.0, "kv": 0.0, "used": 0.0, "in_flight": 0.0}

    async def main() -> list[int]:
        async with srv.async_client(timeout=120.0) as client:
            async def one(i: int) -> int:
                r = await client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": f"Pressure {i}",
                                                               "max_tokens": 180, "ignore_eos": True})
                return r.status_code

            tasks = [asyncio.create_task(one(i)) for i in range(4)]
            while not all(t.done() for t in tasks):
                m = await asyncio.to_thread(srv.metrics)
                peak["running"] = max(peak["running"], m[("vllm:num_requests_running", ())])
                peak["waiting"] = max(peak["waiting"], m[("vllm:num_requests_waiting", ())])
                peak["kv"] = max(peak["kv"], m[("vllm:kv_cache_usage_perc", ())])
                peak["used"] = max(peak["used"], m[("infergrid:kv_cache_used_blocks", ())])
                peak["in_flight"] = max(peak["in_flight"], m[("infergrid:num_requests_in_flight", ())])
                await asyncio.sleep(0.02)
            return [t.result() for t in tasks]

    assert asyncio.run(main()) == [200] * 4
    time.sleep(0.2)
    after = srv.metrics()
    total_blocks = after[("infergrid:kv_cache_total_blocks", ())]
    assert peak["running"] >= 2 and peak["waiting"] >= 1 and peak["in_flight"] == 4, peak
    assert peak["kv"] > 0.5 and peak["used"] > 0.5 * total_blocks, peak
    assert delta(before, after, "vllm:num_preemptions_total") >= 1
    assert delta(before, after, "infergrid:prefix_cache_evicted_blocks_total") >= 1  # the pool had to reuse
    assert after[("vllm:num_requests_running", ())] == 0 and after[("vllm:num_requests_waiting", ())] == 0
    assert after[("vllm:kv_cache_usage_perc", ())] == 0 and after[("infergrid:kv_cache_used_blocks", ())] == 0
    assert delta(before, after, "vllm:generation_tokens_total") >= 4 * 180
    assert delta(before, after, "vllm:request_success_total", finished_reason="length") == 4


def test_spec_decode_counters_move_with_ngram_speculation(start_worker: Callable[..., WorkerServer]) -> None:
    """With n-gram speculation on, a repetitive prompt drafts and accepts tokens, and every spec
    counter (including the per-position one) rises; accepted <= draft tokens."""
    spec = start_worker("--speculative-method", "ngram", "--num-speculative-tokens", "3",
                        "--num-gpu-blocks-override", "200", name="spec")
    before = spec.metrics()
    with spec.client() as http:
        ids = [5, 6, 7, 8, 9, 10, 11, 12] * 6
        resp = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": ids, "max_tokens": 24, "temperature": 0,
                                                  "ignore_eos": True})
        assert resp.status_code == 200, resp.text
    after = spec.metrics()
    drafts = delta(before, after, "vllm:spec_decode_num_drafts_total")
    draft_tokens = delta(before, after, "vllm:spec_decode_num_draft_tokens_total")
    accepted = delta(before, after, "vllm:spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and draft_tokens >= drafts
    assert 0 <= accepted <= draft_tokens
    per_pos = sum(v for (name, _), v in after.items() if name == "vllm:spec_decode_num_accepted_tokens_per_pos_total")
    assert per_pos == after[("vllm:spec_decode_num_accepted_tokens_total", ())]


def test_build_1_2_5_buckets_match_vllms() -> None:
    assert build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert build_1_2_5_buckets(4096)[-1] == 2000
    assert build_1_2_5_buckets(MAX_TOKEN_BUCKET)[-1] == MAX_TOKEN_BUCKET


def test_vllm_compatibility_metrics_follow_one_request(server: WorkerServer) -> None:
    """The names peer routers and dashboards query (vLLM's loggers.py): cache_config_info, the token
    histograms, time_per_output_token_seconds and the deprecated gpu_cache_usage_perc."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    info = re.search(r'^vllm:cache_config_info\{([^}]*)\} 1\.0$', text, re.M)
    assert info, "vllm:cache_config_info missing"
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info.group(1)))
    before = server.metrics()
    assert labels["block_size"] == "16" and labels["model_name"] == MODEL_NAME
    assert float(labels["num_gpu_blocks"]) == before[("infergrid:kv_cache_total_blocks", ())] > 0
    assert {"gpu_memory_utilization", "enable_prefix_caching", "cache_dtype", "engine"} <= set(labels)
    with server.client() as http:
        usage = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Tokens in, tokens out",
                                                   "max_tokens": 7, "ignore_eos": True}).json()["usage"]
    after = server.metrics()
    assert delta(before, after, "vllm:request_prompt_tokens_count") == 1
    assert delta(before, after, "vllm:request_prompt_tokens_sum") == usage["prompt_tokens"]
    assert delta(before, after, "vllm:request_generation_tokens_count") == 1
    assert delta(before, after, "vllm:request_generation_tokens_sum") == usage["completion_tokens"] == 7
    # the 10-token bucket holds the 7 generated tokens; the 5-token one does not
    assert delta(before, after, "vllm:request_generation_tokens_bucket", le="10.0") == 1
    assert delta(before, after, "vllm:request_generation_tokens_bucket", le="5.0") == 0
    tpot = delta(before, after, "vllm:time_per_output_token_seconds_count")
    assert 1 <= tpot == delta(before, after, "vllm:inter_token_latency_seconds_count") <= 6
    assert delta(before, after, "vllm:time_per_output_token_seconds_sum") == pytest.approx(
        delta(before, after, "vllm:inter_token_latency_seconds_sum"))
    assert after[("vllm:gpu_cache_usage_perc", ())] == after[("vllm:kv_cache_usage_perc", ())]
