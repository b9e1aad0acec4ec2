"""Unit tests of the server's pure parts: stall detector, admission, error params, metric mirroring,
content types, CLI arguments."""

from __future__ import annotations

import argparse
import asyncio
import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from infergrid.worker.engine.stats import EngineStats
from infergrid.worker.server import cli
from infergrid.worker.server.admission import AdmissionController
from infergrid.worker.server.errors import APIError, param_from_loc
from infergrid.worker.server.lifecycle import StallDetector
from infergrid.worker.server.logprobs import MIN_LOGPROB, finite
from infergrid.worker.server.metrics import EngineStatsCollector, LatencyWindow, ServerGauges
from infergrid.worker.server.middleware import is_json_content_type


def test_stall_detector() -> None:
    d = StallDetector(stall_timeout_s=5.0)
    assert not d.update(num_unfinished=3, num_steps_total=10, now=100.0)
    assert not d.update(3, 10, 104.9)
    assert d.update(3, 10, 105.0)  # requests waiting, no step for 5 s
    assert not d.update(3, 11, 105.1)  # a step happened
    assert not d.update(0, 11, 200.0)  # idle is not a stall
    assert not d.update(2, 11, 204.0)
    assert d.update(2, 11, 205.5)


def test_admission_limits_and_states() -> None:
    a = AdmissionController(max_queue_size=3)
    with pytest.raises(APIError) as err:
        a.acquire()
    assert err.value.status == 503 and err.value.code == "not_ready"
    a.open()
    a.acquire(2)
    a.acquire(1)
    with pytest.raises(APIError) as err:
        a.acquire(1)
    assert err.value.status == 429 and err.value.headers == {"Retry-After": "1"}
    with pytest.raises(APIError) as err:
        a.check(4)
    assert err.value.status == 400
    a.release(2)
    with a.admit(2):
        assert a.num_in_flight == 3
    assert a.num_in_flight == 1 and a.num_rejected["queue_full"] == 1
    a.close("draining")
    with pytest.raises(APIError) as err:
        a.acquire()
    assert err.value.status == 503 and err.value.code == "draining"

    async def idle() -> tuple[bool, bool]:
        early = await a.wait_idle(0.01)
        asyncio.get_running_loop().call_later(0.02, a.release, 1)
        return early, await a.wait_idle(2.0)

    assert asyncio.run(idle()) == (False, True)


@pytest.mark.parametrize(("loc", "param"), [
    (("body", "max_tokens"), "max_tokens"),
    (("body", "messages", 0, "content", "str"), "messages[0].content"),
    (("body", "prompt", "list[int]", 0), "prompt"),
    (("body", "requests", 1, "max_tokens"), "requests[1].max_tokens"),
    (("body", "response_format", "type"), "response_format.type"),
    (("body",), None),
])
def test_param_from_loc(loc: tuple, param: str | None) -> None:
    assert param_from_loc(loc) == param


def test_collector_mirrors_engine_stats() -> None:
    stats = EngineStats(num_running=3, num_waiting=2, kv_cache_usage=0.25, num_total_blocks=100, num_used_blocks=25,
                        num_preemptions_total=4, prompt_tokens_total=500, generation_tokens_total=700,
                        prefix_cache_queries_total=480, prefix_cache_hits_total=160, spec_decode_num_drafts_total=9,
                        spec_decode_num_draft_tokens_total=27, spec_decode_num_accepted_tokens_total=20,
                        last_step_time=0.0, num_steps_total=77)
    registry = CollectorRegistry()
    registry.register(EngineStatsCollector(lambda: stats, "m", ServerGauges(
        num_in_flight=lambda: 5, rejected=lambda: {"queue_full": 6}, is_ready=lambda: True,
        is_healthy=lambda: True, is_draining=lambda: False)))
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    m = (("model_name", "m"),)
    assert values[("vllm:num_requests_running", m)] == 3
    assert values[("vllm:num_requests_waiting", m)] == 2
    assert values[("vllm:kv_cache_usage_perc", m)] == 0.25
    assert values[("vllm:num_preemptions_total", m)] == 4
    assert values[("vllm:prefix_cache_hits_total", m)] == 160
    assert values[("vllm:spec_decode_num_drafts_total", m)] == 9
    assert values[("vllm:spec_decode_num_draft_tokens_total", m)] == 27
    assert values[("vllm:spec_decode_num_accepted_tokens_total", m)] == 20
    assert values[("infergrid:kv_cache_used_blocks", m)] == 25
    assert values[("infergrid:num_requests_in_flight", m)] == 5
    assert values[("infergrid:admission_rejected_total", (("model_name", "m"), ("reason", "queue_full")))] == 6


def test_collector_exports_zeros_before_the_engine_loads() -> None:
    registry = CollectorRegistry()
    registry.register(EngineStatsCollector(lambda: None, "m", ServerGauges(
        num_in_flight=lambda: 0, rejected=dict, is_ready=lambda: False, is_healthy=lambda: True,
        is_draining=lambda: False)))
    text = generate_latest(registry).decode()
    assert 'vllm:num_requests_running{model_name="m"} 0.0' in text
    assert 'infergrid:ready{model_name="m"} 0.0' in text


def test_latency_window_percentiles() -> None:
    w = LatencyWindow(maxlen=100)
    assert w.percentile(50) is None
    for v in range(1, 101):
        w.add(float(v))
    assert w.percentile(50) == 50.0 and w.percentile(95) == 95.0 and w.percentile(100) == 100.0


def test_logprobs_are_json_safe() -> None:
    assert finite(-math.inf) == MIN_LOGPROB and finite(math.nan) == MIN_LOGPROB and finite(-1.5) == -1.5


@pytest.mark.parametrize(("value", "ok"), [
    (b"application/json", True), (b"application/json; charset=utf-8", True), (b"Application/JSON", True),
    (b"application/merge-patch+json", True), (b"text/plain", False), (b"application/x-www-form-urlencoded", False),
    (b"multipart/form-data; boundary=x", False), (b"", False),
])
def test_json_content_types(value: bytes, ok: bool) -> None:
    assert is_json_content_type(value) is ok


def parse(*argv: str) -> argparse.Namespace:
    return cli.add_serve_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_cli_maps_vllm_engine_args() -> None:
    args = parse("--model", "/m", "--dtype", "float32", "--max-model-len", "512", "--block-size", "32",
                 "--gpu-memory-utilization", "0.5", "--max-num-seqs", "8", "--max-num-batched-tokens", "1024",
                 "--enforce-eager", "--no-enable-prefix-caching", "--tensor-parallel-size", "2",
                 "--speculative-method", "ngram", "--num-speculative-tokens", "3", "--num-gpu-blocks-override", "64")
    cfg = cli.engine_config_from_args(args)
    assert (cfg.model, cfg.dtype, cfg.max_model_len, cfg.block_size) == ("/m", "float32", 512, 32)
    assert (cfg.gpu_memory_utilization, cfg.max_num_seqs, cfg.max_num_batched_tokens) == (0.5, 8, 1024)
    assert cfg.enforce_eager and not cfg.enable_prefix_caching and cfg.tensor_parallel_size == 2
    assert (cfg.speculative_method, cfg.num_speculative_tokens, cfg.num_gpu_blocks_override) == ("ngram", 3, 64)
    assert cfg.speculative_disable_by_batch_size == 32  # (the engine's default)
    tuned = parse("--model", "/m", "--speculative-method", "ngram", "--num-speculative-tokens", "3",
                  "--speculative-disable-by-batch-size", "8")
    assert cli.engine_config_from_args(tuned).speculative_disable_by_batch_size == 8
    with pytest.raises(ValueError, match="speculative_disable_by_batch_size must be an integer >= 1"):
        cli.engine_config_from_args(parse("--model", "/m", "--speculative-disable-by-batch-size", "0"))
    with pytest.raises(ValueError, match="speculative_disable_by_batch_size is only used when speculative_method is set"):
        cli.engine_config_from_args(parse("--model", "/m", "--speculative-disable-by-batch-size", "8"))


def test_cli_server_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.API_KEY_ENV, "from-env")
    s = cli.settings_from_args(parse("--model", "/m/x", "--max-queue-size", "9", "--drain-timeout", "3"))
    assert s.api_key == "from-env" and s.served_model_names == ("/m/x",)
    assert (s.max_queue_size, s.drain_timeout_s) == (9, 3.0)
    s = cli.settings_from_args(parse("--model", "/m/x", "--api-key", "flag", "--served-model-name", "a", "b"))
    assert s.api_key == "flag" and s.served_model_names == ("a", "b")


def test_cli_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--model", "/m", "--max-num-seqs", "0"]) == 2
    assert "max_num_seqs" in capsys.readouterr().err
    assert cli.main(["--model", "/m", "--max-queue-size", "0"]) == 2


def test_a_request_while_the_model_loads_is_a_503_not_a_500() -> None:
    """Validating token ids or the length needs the model's vocabulary and context: before the engine exists
    that is the same "not ready yet" 503 (with Retry-After) as any other engine access."""
    from infergrid.worker.server.lifecycle import Lifecycle
    from infergrid.worker.server.serving_base import ServingBase

    admission = AdmissionController(max_queue_size=3)
    lifecycle = Lifecycle(engine_factory=lambda: None, admission=admission)
    serving = ServingBase(lifecycle, admission, metrics=None, served_model_names=["m"])  # type: ignore[arg-type]
    for call in (lambda: serving.prompt_from_ids([1, 2], "prompt"), lambda: serving.max_model_len):
        with pytest.raises(APIError) as err:
            call()
        assert err.value.status == 503 and err.value.code == "not_ready"
        assert err.value.headers == {"Retry-After": "1"}
