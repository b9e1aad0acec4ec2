"""Automatic prefix caching end to end: greedy outputs identical with the cache on and off (also under
eviction and preemption in a tiny pool), and prefix hits reported per request and in the counters."""

from __future__ import annotations

import random

import pytest

from infergrid.worker import LLM, AsyncLLM, EngineConfig, SamplingParams

BS = 8
PREFIX_LEN = 40  # 5 full blocks
VOCAB_LO, VOCAB_HI = 6, 384  # the tiny tokenizer's ids past its special tokens


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(n)]


def shared_prefix_batch(seed: int = 0) -> list[list[int]]:
    """Prompts sharing one prefix with suffixes ending mid-block and on block edges, the bare prefix
    (a whole-prompt hit still recomputes its last token), a duplicate, and two unrelated prompts."""
    rng = random.Random(seed)
    prefix = random_ids(rng, PREFIX_LEN)
    prompts = [prefix + random_ids(rng, n) for n in (3, 8, 13, 0, 21, 5, 16, 11)]
    prompts.insert(3, random_ids(rng, 45))
    prompts.append(list(prompts[1]))
    prompts.append(random_ids(rng, 30))
    return prompts


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run(model: str, prompts: list[list[int]], max_tokens: int, enable_prefix_caching: bool, **engine_args):
    llm = LLM(model, dtype="float32", max_model_len=256, block_size=BS,
              enable_prefix_caching=enable_prefix_caching, **engine_args)
    outs = llm.generate(prompts, greedy(max_tokens))
    return [o.outputs[0].token_ids for o in outs], outs, llm.llm_engine.get_stats()


def test_greedy_outputs_match_with_and_without_the_cache(tiny_llama):
    prompts = shared_prefix_batch()
    # max_num_seqs 4: later requests are admitted after the prefix was computed, so they hit it.
    on, outs, stats = run(tiny_llama, prompts, 16, True, max_num_seqs=4, max_num_batched_tokens=64)
    off, _, off_stats = run(tiny_llama, prompts, 16, False, max_num_seqs=4, max_num_batched_tokens=64)
    assert on == off
    assert all(len(t) == 16 for t in on)
    assert stats.prefix_cache_hits_total > 0
    assert stats.prefix_cache_hits_total == sum(o.num_cached_tokens for o in outs)
    assert all(o.num_cached_tokens % BS == 0 for o in outs)
    assert (off_stats.prefix_cache_queries_total, off_stats.prefix_cache_hits_total) == (0, 0)


def test_parity_under_eviction_and_preemption(tiny_llama):
    prompts = shared_prefix_batch(seed=1)
    # 19 usable blocks of 8 tokens; one request needs up to 9 blocks, so decodes run the pool dry.
    args = dict(max_num_seqs=8, max_num_batched_tokens=64, num_gpu_blocks_override=20)
    on, outs, stats = run(tiny_llama, prompts, 24, True, **args)
    off, _, off_stats = run(tiny_llama, prompts, 24, False, **args)
    assert on == off
    assert stats.num_preemptions_total > 0 and off_stats.num_preemptions_total > 0
    assert stats.prefix_cache_evicted_blocks_total > 0
    assert stats.prefix_cache_hits_total > 0
    assert any(o.num_cached_tokens > 0 for o in outs)
    assert stats.num_used_blocks == 0 and off_stats.prefix_cache_evicted_blocks_total == 0


def second_wave(seed: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    prefix = random_ids(rng, PREFIX_LEN + 3)
    first = [prefix + random_ids(rng, n) for n in (4, 9)]
    second = [prefix + random_ids(rng, n) for n in (2, 7, 12)]
    return first, second


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_second_wave_reports_cached_tokens(tiny_llama, enable_prefix_caching):
    llm = LLM(tiny_llama, dtype="float32", max_model_len=256, block_size=BS,
              enable_prefix_caching=enable_prefix_caching)
    first, second = second_wave(seed=2)
    engine = llm.llm_engine
    llm.generate(first, greedy(4))
    before = engine.get_stats()
    outs = llm.generate(second, greedy(4))
    after = engine.get_stats()
    queries = after.prefix_cache_queries_total - before.prefix_cache_queries_total
    hits = after.prefix_cache_hits_total - before.prefix_cache_hits_total
    if enable_prefix_caching:
        assert [o.num_cached_tokens for o in outs] == [PREFIX_LEN] * 3  # 43-token prefix: 5 full blocks
        assert queries == sum(len(p) for p in second)  # counted in tokens, like vLLM
        assert hits == 3 * PREFIX_LEN
    else:
        assert [o.num_cached_tokens for o in outs] == [0, 0, 0]
        assert (queries, hits) == (0, 0)


@pytest.mark.asyncio
async def test_async_second_wave_reports_cached_tokens(tiny_llama):
    engine = AsyncLLM(EngineConfig(model=tiny_llama, dtype="float32", max_model_len=256, block_size=BS))
    await engine.start()
    try:
        first, second = second_wave(seed=3)
        for i, prompt in enumerate(first):  # one after the other: the second hits the first's prefix
            outs = [out async for out in engine.generate(prompt, greedy(4), f"first-{i}")]
            assert outs[-1].num_cached_tokens == (0, PREFIX_LEN)[i]
        before = engine.stats()
        for i, prompt in enumerate(second):
            outs = [out async for out in engine.generate(prompt, greedy(4), f"second-{i}")]
            assert all(o.num_cached_tokens == PREFIX_LEN for o in outs)  # from the first output on
        after = engine.stats()
        assert after.prefix_cache_hits_total - before.prefix_cache_hits_total == 3 * PREFIX_LEN
        assert after.prefix_cache_queries_total - before.prefix_cache_queries_total == sum(map(len, second))
    finally:
        await engine.shutdown()


def test_router_hashes_of_a_text_prompt_are_the_workers_cache_keys(tiny_llama):
    from infergrid.worker.engine.prefix_hash import hash_prompt_blocks

    llm = LLM(tiny_llama, dtype="float32", max_model_len=256, block_size=BS)
    prompt = "Once upon a time there was a little town by the river, and the people of the town"
    llm.generate(prompt, greedy(2))
    keys = hash_prompt_blocks(llm.tokenizer(prompt)["input_ids"], block_size=BS)  # as a router would
    assert len(keys) >= 2
    assert all(k in llm.llm_engine.scheduler.kv_cache_manager.pool.cached_blocks for k in keys)
