"""Speculative decoding end to end on tiny checkpoints: greedy output is identical with speculation
on and off (n-gram and draft-model proposers) in mixed batches, under forced preemption, chunked
prefill and prefix-cache hits; a draft equal to the target accepts ~100%, a random one ~chance;
the guard (spec_decode/guard.py) cools down requests whose drafts fail; the counters add up."""

from __future__ import annotations

import pytest
from spec_prompts import PROMPTS

from infergrid.worker import LLM, SamplingParams
from infergrid.worker.engine.request import RequestStatus
from infergrid.worker.spec_decode import guard

BASE = dict(dtype="float32", max_model_len=256, max_num_seqs=8, block_size=8)


def greedy(max_tokens: int = 40, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


MIXED_PARAMS = [
    greedy(40),
    greedy(33, repetition_penalty=1.3, frequency_penalty=0.2),
    # Sampled, in the same batches (ignore_eos: how many tokens they emit must not depend on the draw).
    SamplingParams(temperature=1.0, top_k=20, max_tokens=30, seed=3, ignore_eos=True),
    greedy(45, logprobs=2),
    greedy(20, min_tokens=10),
    SamplingParams(temperature=0.8, top_p=0.9, max_tokens=25, ignore_eos=True),
]


@pytest.fixture(scope="module")
def models(tiny_model):
    return {"target": tiny_model("llama"), "random": tiny_model("llama_draft")}


def never_cool_down(monkeypatch) -> None:
    """Every request keeps speculating whatever its acceptance (the guard's own tests:
    test_spec_decode_guard.py), so that a random draft is verified at every step."""
    monkeypatch.setattr(guard, "MIN_MEAN_ACCEPTED", 0.0)


def draft_model_steps(llm: LLM) -> set[int]:
    """The engine steps (numbered by the speculative decoder) in which the draft model runs from now on."""
    decoder = llm.llm_engine.spec_decoder
    runner, steps = decoder.proposer.runner, set()
    forward = runner.forward

    def recorded(batch):
        steps.add(decoder.num_steps)  # (the guard counts the step at the end of propose)
        return forward(batch)

    runner.forward = recorded
    return steps


def spec_args(method: str, models: dict[str, str]) -> dict:
    if method == "ngram":
        return dict(speculative_method="ngram", num_speculative_tokens=4)
    draft = models["target"] if method == "draft=target" else models["random"]
    return dict(speculative_method="draft", num_speculative_tokens=3, draft_model=draft)


@pytest.fixture(scope="module")
def baseline(models):
    llm = LLM(models["target"], **BASE)
    return llm.generate(PROMPTS, MIXED_PARAMS)


def _greedy_ids(outs, params=MIXED_PARAMS):
    return {i: o.outputs[0].token_ids for i, (o, p) in enumerate(zip(outs, params, strict=True)) if p.is_greedy}


def acceptance(llm: LLM) -> float:
    s = llm.llm_engine.get_stats()
    return s.spec_decode_num_accepted_tokens_total / max(1, s.spec_decode_num_draft_tokens_total)


def check_counters(llm: LLM) -> None:
    s = llm.llm_engine.get_stats()
    per_pos = s.spec_decode_num_accepted_tokens_per_pos
    assert sum(per_pos) == s.spec_decode_num_accepted_tokens_total
    assert list(per_pos) == sorted(per_pos, reverse=True)  # reaching position i+1 needs position i
    assert s.spec_decode_num_accepted_tokens_total <= s.spec_decode_num_draft_tokens_total
    assert s.spec_decode_num_drafts_total <= s.spec_decode_num_draft_tokens_total


@pytest.mark.parametrize("cool_down", [True, False])
@pytest.mark.parametrize("method", ["ngram", "draft=target", "draft=random", "draft=target, fp8 head"])
def test_greedy_identical_in_mixed_batches(models, baseline, method, cool_down, monkeypatch):
    if not cool_down:
        never_cool_down(monkeypatch)
    fp8 = dict(draft_lm_head_dtype="fp8") if method.endswith("fp8 head") else {}
    llm = LLM(models["target"], **BASE, **spec_args(method.split(",")[0], models), **fp8)
    outs = llm.generate(PROMPTS, MIXED_PARAMS)
    assert _greedy_ids(outs) == _greedy_ids(baseline)
    for out, params in zip(outs, MIXED_PARAMS, strict=True):
        assert len(out.outputs[0].token_ids) == params.max_tokens and out.outputs[0].finish_reason == "length"
    # Logprobs of verified tokens are the target's raw logprobs, as without speculation.
    spec_lp, base_lp = outs[3].outputs[0].logprobs, baseline[3].outputs[0].logprobs
    assert len(spec_lp) == len(base_lp) == 45
    for a, b in zip(spec_lp, base_lp, strict=True):
        assert a.keys() == b.keys()
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 and a[t].rank == b[t].rank for t in a)
    stats = llm.llm_engine.get_stats()
    assert stats.generation_tokens_total == sum(p.max_tokens for p in MIXED_PARAMS)
    assert stats.spec_decode_num_drafts_total > 0
    check_counters(llm)
    if method != "draft=random":
        assert stats.num_steps_total < 45  # speculation saved steps (the longest request has 45 tokens)


def test_draft_equal_to_target_accepts_all_and_random_draft_accepts_chance(models, monkeypatch):
    never_cool_down(monkeypatch)
    params = greedy(48)
    same = LLM(models["target"], **BASE, **spec_args("draft=target", models))
    same.generate(PROMPTS, params)
    rand = LLM(models["target"], **BASE, **spec_args("draft=random", models))
    rand.generate(PROMPTS, params)
    s_same, s_rand = same.llm_engine.get_stats(), rand.llm_engine.get_stats()
    assert acceptance(same) >= 0.98
    # Every verification of a perfect draft runs to the end (3 drafts + 1 token per step; fewer
    # drafts only in a request's last step, trimmed to its max_tokens).
    per_pos = s_same.spec_decode_num_accepted_tokens_per_pos
    assert per_pos[0] == s_same.spec_decode_num_drafts_total and per_pos[2] >= per_pos[0] - len(PROMPTS)
    # Two unrelated random models agree on the argmax about as often as chance (1/384 per token).
    assert acceptance(rand) < 0.05
    assert s_rand.spec_decode_num_draft_tokens_total >= 3 * s_rand.spec_decode_num_drafts_total * 0.9
    check_counters(same)
    check_counters(rand)


def test_guard_cools_a_useless_draft_down_and_keeps_a_good_lookup_on(models):
    # n-gram on looping text keeps speculating at full depth.
    ngram = LLM(models["target"], **BASE, **spec_args("ngram", models))
    ngram.generate(PROMPTS, greedy(96))
    assert acceptance(ngram) > 0.7
    n = ngram.llm_engine.get_stats()
    assert n.spec_decode_num_draft_tokens_total > 3 * n.spec_decode_num_drafts_total
    assert ngram.llm_engine.spec_decoder.guard.num_cool_downs_total <= len(PROMPTS)
    # A random draft is verified WINDOW times per request, then cools down for 16, 32, 64 steps; the
    # requests cool down together, and the engine pipelines meanwhile.
    llm = LLM(models["target"], **BASE, **spec_args("draft=random", models))
    ran = draft_model_steps(llm)
    llm.generate(PROMPTS, greedy(96))
    s = llm.llm_engine.get_stats()
    assert 0 < s.spec_decode_num_drafts_total <= 4 * guard.WINDOW * len(PROMPTS)
    assert len(ran) <= 0.5 * s.num_steps_total
    assert llm.llm_engine.num_pipelined_steps_total >= 0.4 * s.num_steps_total
    decoder = llm.llm_engine.spec_decoder
    assert decoder.guard.num_cool_downs_total >= 2 * len(PROMPTS)


@pytest.mark.parametrize("method", ["ngram", "draft=target"])
def test_preemption_chunked_prefill_and_prefix_hits(models, method, monkeypatch):
    """A KV pool that holds the largest request but not three at once forces preemption by
    recompute; a 16-token budget chunks the prompts; a shared prefix gives prefix-cache hits.
    Output stays identical, and a draft equal to the target still accepts ~all (its KV stays
    consistent through rewinds, preemption and hit blocks)."""
    never_cool_down(monkeypatch)
    prefix = "The quick brown fox jumps over the lazy dog. A small model can still say a few words. "
    prompts = [prefix + p for p in PROMPTS]
    params = [greedy(36 + 3 * i) for i in range(len(prompts))]
    ref = LLM(models["target"], **BASE)
    expected = [o.outputs[0].token_ids for o in ref.generate(prompts, params)]
    largest = max(len(ref.tokenizer(p)["input_ids"]) + sp.max_tokens for p, sp in zip(prompts, params, strict=True))
    num_blocks = -(-largest // BASE["block_size"]) + 3  # + the null block and a little room
    llm = LLM(models["target"], **{**BASE, "max_num_seqs": 6}, num_gpu_blocks_override=num_blocks,
              max_num_batched_tokens=16, **spec_args(method, models))
    first = llm.generate(prompts[:3], params[:3])
    second = llm.generate(prompts, params)  # the first three hit the cache in full, the rest the prefix
    assert [o.outputs[0].token_ids for o in first] == expected[:3]
    assert [o.outputs[0].token_ids for o in second] == expected
    s = llm.llm_engine.get_stats()
    assert s.num_preemptions_total > 0
    assert s.prefix_cache_hits_total > 0 and any(o.num_cached_tokens > 0 for o in second)
    assert s.spec_decode_num_draft_tokens_total > 0
    if method == "draft=target":
        assert acceptance(llm) >= 0.97
        assert llm.llm_engine.spec_decoder.proposer.num_ahead_proposals_total > 0  # proposed ahead
    check_counters(llm)


@pytest.mark.parametrize("method", ["ngram", "draft=target"])
def test_stop_token_inside_accepted_drafts(models, baseline, method):
    """A stop token in the middle of a run of accepted drafts ends the request right there."""
    ref = baseline[0].outputs[0].token_ids
    stop_at = next(i for i in range(12, len(ref)) if ref[i] not in ref[:i])
    llm = LLM(models["target"], **BASE, **spec_args(method, models))
    out = llm.generate([PROMPTS[0]], greedy(40, stop_token_ids=[ref[stop_at]]))[0].outputs[0]
    assert out.token_ids == ref[: stop_at + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", ref[stop_at])
    assert llm.llm_engine.get_stats().generation_tokens_total == stop_at + 1


def test_abort_with_pending_drafts_and_max_model_len_edge(models):
    expected = [o.outputs[0].token_ids for o in LLM(models["target"], **BASE).generate(
        [PROMPTS[0], PROMPTS[2]], greedy(40))]
    llm = LLM(models["target"], **{**BASE, "max_model_len": 64}, **spec_args("draft=target", models))
    engine = llm.llm_engine
    prompt_ids = llm.tokenizer(PROMPTS[0])["input_ids"]
    engine.add_request("a", PROMPTS[0], greedy(40))
    engine.add_request("edge", prompt_ids, greedy(64 - len(prompt_ids)))  # fills max_model_len exactly
    engine.add_request("b", PROMPTS[2], greedy(40))
    for _ in range(3):
        engine.step()
    assert engine.scheduler.requests["a"].spec_token_ids  # drafts wait for the next step
    engine.abort_request("a")
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["b"].outputs[0].token_ids == expected[1]
    edge = finals["edge"].outputs[0]
    assert len(edge.token_ids) == 64 - len(prompt_ids) and edge.finish_reason == "length"
    assert edge.token_ids[:40] == expected[0]
    assert engine.scheduler.kv_cache_manager.get_usage() == 0.0
    decoder = engine.spec_decoder
    assert "a" not in decoder.drafted and "a" not in decoder.guard._states  # forgotten
    assert decoder.proposer.num_ahead_proposals_total > 0


def test_seeded_sampling_with_speculation_is_reproducible(models):
    params = SamplingParams(n=2, temperature=1.0, max_tokens=24, seed=11, ignore_eos=True)
    llm = LLM(models["target"], **BASE, **spec_args("draft=random", models))
    first = llm.generate(PROMPTS[:2], params)
    assert llm.llm_engine.get_stats().spec_decode_num_drafts_total > 0
    second = llm.generate(PROMPTS[:2], params)
    assert [[c.token_ids for c in o.outputs] for o in first] == [[c.token_ids for c in o.outputs] for o in second]
    assert all(len(c.token_ids) == 24 for o in first for c in o.outputs)
    assert RequestStatus.FINISHED_LENGTH.finish_reason == first[0].outputs[0].finish_reason


def test_draft_catches_up_each_token_about_once(models):
    """The draft computes the prompt once and then each new token about once (plus the bonus token
    it recomputes next step), not the whole context every step; a prefix hit spares its blocks."""
    llm = LLM(models["target"], **BASE, **spec_args("draft=target", models))
    draft = llm.llm_engine.spec_decoder.proposer
    prompt = PROMPTS[1]
    num_prompt = len(llm.tokenizer(prompt)["input_ids"])
    llm.generate([prompt], greedy(40))
    steps = llm.llm_engine.get_stats().num_steps_total
    first = draft.num_catch_up_tokens_total
    assert num_prompt + 39 <= first <= num_prompt + 40 + steps
    llm.generate([prompt], greedy(40))  # full prefix hit: target and draft KV reused
    second = draft.num_catch_up_tokens_total - first
    assert second <= num_prompt % BASE["block_size"] + 40 + steps
    assert acceptance(llm) >= 0.98


@pytest.mark.asyncio
async def test_async_streaming_with_speculation(models):
    """Through AsyncLLM (the server's engine): a step can stream several tokens at once, the deltas
    add up to the offline result, and stats() carries the spec-decode counters."""
    from infergrid.worker import AsyncLLM, EngineConfig

    engine = AsyncLLM(EngineConfig(model=models["target"], **BASE, **spec_args("ngram", models)))
    await engine.start()
    try:
        params = greedy(40)
        outs = [o async for o in engine.generate(PROMPTS[3], params, "s1")]
        final = outs[-1].outputs[0]
        assert [t for o in outs for t in o.outputs[0].delta_token_ids] == final.token_ids
        assert max(len(o.outputs[0].delta_token_ids) for o in outs) > 1
        expected = LLM(models["target"], **BASE).generate([PROMPTS[3]], params)[0].outputs[0].token_ids
        assert final.token_ids == expected
        stats = engine.stats()
        assert stats.spec_decode_num_accepted_tokens_total > 0
        assert sum(stats.spec_decode_num_accepted_tokens_per_pos) == stats.spec_decode_num_accepted_tokens_total
    finally:
        await engine.shutdown(drain_timeout=5)


@pytest.mark.parametrize("method", ["ngram", "draft=random"])
def test_seeded_sampled_request_drafts_the_same_alone_and_in_a_batch_over_the_cutoff(models, method, monkeypatch):
    """A seeded sampled request's random draws follow its drafts, so the guard decides them on the request's
    own clock and ignores the batch cutoff: alone, or among greedy requests that push the batch over
    the cutoff (their steps then carry no drafts of theirs), it proposes at the same own steps, verifies
    as many drafts and emits the same tokens."""
    # (n-gram: a low temperature keeps the tiny model's loops, so that lookups find something)
    temperature = 0.2 if method == "ngram" else 1.0
    seeded = SamplingParams(temperature=temperature, top_k=20, max_tokens=60, seed=5, ignore_eos=True)
    runs = []
    for others in (0, 3):
        llm = LLM(models["target"], **BASE, **spec_args(method, models), speculative_disable_by_batch_size=2)
        decoder = llm.llm_engine.spec_decoder
        proposals: list[int] = []  # the seeded request's drafts per proposal step in which it sampled
        propose = decoder.propose

        def recorded(scheduler_output, sampled_token_ids, pipelined=False, propose=propose, proposals=proposals):
            drafts = propose(scheduler_output, sampled_token_ids, pipelined)
            if "s" in sampled_token_ids:
                proposals.append(len(drafts.get("s", [])))
            return drafts

        monkeypatch.setattr(decoder, "propose", recorded)
        engine = llm.llm_engine
        engine.add_request("s", PROMPTS[1], seeded)
        for i in range(others):
            engine.add_request(f"g{i}", PROMPTS[2 + i], greedy(50))
        finals = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out.outputs[0].token_ids
        runs.append((finals["s"], proposals, decoder.guard.num_steps_over_cutoff_total))
    (alone, alone_proposals, _), (batched, batched_proposals, num_over) = runs
    assert num_over > 0  # the greedy requests made steps over the cutoff
    assert batched == alone and batched_proposals == alone_proposals
    assert sum(alone_proposals) > 0
