"""AsyncLLM: streaming deltas, concurrency, aborts (explicit, cancel, early exit), deadlines,
errors, health/stats and shutdown with drain."""

from __future__ import annotations

import asyncio
import time

import pytest

from infergrid.worker import LLM, AsyncLLM, EngineConfig, SamplingParams
from infergrid.worker.engine.async_llm import EngineShuttingDownError

pytestmark = pytest.mark.asyncio

PROMPT = "Once upon a time there"


def make_engine(path: str, **kwargs) -> AsyncLLM:
    args = dict(model=path, dtype="float32", max_model_len=256, block_size=8, max_num_seqs=8) | kwargs
    return AsyncLLM(EngineConfig(**args))


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return make_engine(tiny_llama)


async def collect(engine: AsyncLLM, prompt, params: SamplingParams, request_id: str, **kwargs) -> list:
    return [out async for out in engine.generate(prompt, params, request_id, **kwargs)]


async def wait_until(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_streamed_deltas_add_up_to_the_offline_result(engine, tiny_llama):
    await engine.start()
    params = SamplingParams(temperature=0.0, max_tokens=16)
    outs = await collect(engine, PROMPT, params, "stream-1")
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    final = outs[-1].outputs[0]
    assert "".join(o.outputs[0].delta_text for o in outs) == final.text
    assert [t for o in outs for t in o.outputs[0].delta_token_ids] == final.token_ids
    assert len(outs) >= 2
    offline = LLM(tiny_llama, dtype="float32", max_model_len=256).generate([PROMPT], params)[0]
    assert final.token_ids == offline.outputs[0].token_ids
    assert final.text == offline.outputs[0].text


async def test_concurrent_requests(engine):
    params = [SamplingParams(temperature=0.0, max_tokens=8 + i) for i in range(6)]
    results = await asyncio.gather(*(collect(engine, PROMPT, p, f"conc-{i}") for i, p in enumerate(params)))
    lengths = [len(r[-1].outputs[0].token_ids) for r in results]
    assert lengths == [8 + i for i in range(6)]
    first = results[0][-1].outputs[0].token_ids
    assert all(r[-1].outputs[0].token_ids[:8] == first for r in results)  # same greedy prefix


async def test_streaming_never_shows_part_of_a_stop_string(engine):
    base = (await collect(engine, PROMPT, SamplingParams(temperature=0.0, max_tokens=24), "stop-base"))[-1]
    text = base.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    outs = await collect(engine, PROMPT, SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]), "stop-1")
    final = outs[-1].outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert final.text == text[: text.index(stop)]
    streamed = ""
    for o in outs:
        streamed += o.outputs[0].delta_text
        assert final.text.startswith(streamed)


async def test_cancelling_the_consumer_aborts_and_frees_blocks(engine):
    started = asyncio.Event()

    async def consume():
        async for _ in engine.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True), "cancel-1"):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 10)
    assert engine.stats().num_running == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: engine.stats().num_running == 0 and engine.stats().num_used_blocks == 0)


async def test_leaving_the_loop_early_aborts(engine):
    gen = engine.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True), "early-1")
    async for out in gen:
        assert not out.finished
        break
    await gen.aclose()
    await wait_until(lambda: engine.stats().num_running == 0 and engine.stats().num_used_blocks == 0)


async def test_abort_ends_the_stream_with_abort(engine):
    outs: list = []

    async def consume():
        async for out in engine.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True), "abort-1"):
            outs.append(out)

    task = asyncio.create_task(consume())
    await wait_until(lambda: len(outs) >= 2)
    await engine.abort("abort-1")
    assert (engine.stats().num_used_blocks, engine.stats().num_running) == (0, 0)
    await asyncio.wait_for(task, 10)
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    await engine.abort("no-such-request")  # ignored


async def test_requests_that_cannot_fit_raise_value_error(engine):
    with pytest.raises(ValueError, match="maximum context length"):
        await collect(engine, [1] * 250, SamplingParams(max_tokens=50), "too-long")
    with pytest.raises(ValueError, match="already in use"):
        gen = engine.generate(PROMPT, SamplingParams(max_tokens=100, ignore_eos=True), "dup")
        first = await gen.__anext__()
        assert not first.finished
        try:
            await collect(engine, PROMPT, SamplingParams(max_tokens=4), "dup")
        finally:
            await gen.aclose()
    assert engine.is_healthy()


async def test_waiting_request_past_its_deadline_is_aborted(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=1)
    await engine.start()
    long_task = asyncio.create_task(
        collect(engine, PROMPT, SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True), "long"))
    await wait_until(lambda: engine.stats().num_running == 1)
    outs = await collect(engine, PROMPT, SamplingParams(max_tokens=4), "late", deadline=time.monotonic() + 0.05)
    assert outs[-1].finished
    assert (outs[-1].outputs[0].finish_reason, outs[-1].outputs[0].stop_reason) == ("abort", "deadline")
    assert outs[-1].outputs[0].token_ids == []
    assert (await long_task)[-1].outputs[0].finish_reason == "length"
    await engine.shutdown()


async def test_stats_and_health(engine):
    before = engine.stats()
    await collect(engine, PROMPT, SamplingParams(temperature=0.0, max_tokens=5), "stats-1")
    await wait_until(lambda: engine.stats().num_steps_total > before.num_steps_total)
    after = engine.stats()
    assert after.generation_tokens_total >= before.generation_tokens_total + 5
    assert after.num_total_blocks > 0 and 0.0 <= after.kv_cache_usage <= 1.0
    assert after.last_step_time >= before.last_step_time
    assert engine.is_healthy()


async def test_shutdown_drains_running_requests(tiny_llama):
    engine = make_engine(tiny_llama)
    await engine.start()
    task = asyncio.create_task(
        collect(engine, PROMPT, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), "drained"))
    await wait_until(lambda: engine.stats().num_running == 1)
    await engine.shutdown(drain_timeout=None)
    outs = await task
    assert outs[-1].outputs[0].finish_reason == "length" and len(outs[-1].outputs[0].token_ids) == 30
    with pytest.raises(EngineShuttingDownError):
        await collect(engine, PROMPT, SamplingParams(max_tokens=2), "after")
    assert engine.is_healthy()  # a clean stop is not a failure


async def test_shutdown_aborts_what_outlives_the_drain_timeout(tiny_llama):
    engine = make_engine(tiny_llama)
    await engine.start()
    task = asyncio.create_task(
        collect(engine, PROMPT, SamplingParams(temperature=0.0, max_tokens=240, ignore_eos=True), "cut"))
    await wait_until(lambda: engine.stats().num_running == 1)
    await engine.shutdown(drain_timeout=0.0)
    outs = await task
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 240
