"""GoodputGuard: speculation is blocked at a batch size where synchronous steps delivered fewer tokens
per second than pipelined ones, for a backoff that doubles, and judged afresh afterwards; and the
engine feeds it and obeys it."""

from __future__ import annotations

import pytest

from infergrid.worker import LLM, SamplingParams
from infergrid.worker.spec_decode.goodput_guard import (
    DECAY,
    MARGIN,
    MAX_BLOCK,
    MIN_BLOCK,
    MIN_SAMPLES,
    GoodputGuard,
)

PIPELINED_STEP = 0.0016  # seconds: batch 32, one token each (an H200, 1B: 20,000 tok/s)
# steps of a kind before a judgement: the decayed weight reaches MIN_SAMPLES
N = next(n for n in range(1, 100) if (1 - DECAY**n) / (1 - DECAY) >= MIN_SAMPLES)


def feed(guard: GoodputGuard, step: int, n: int, sync_tokens: int, sync_seconds: float, batch: int = 32) -> int:
    """n pipelined steps, then n synchronous ones; returns the next step."""
    for _ in range(n):
        guard.observe(batch, True, batch, PIPELINED_STEP, step)
        step += 1
    for _ in range(n):
        guard.observe(batch, False, sync_tokens, sync_seconds, step)
        step += 1
    return step


def test_blocks_where_speculating_steps_deliver_less_and_only_there():
    guard = GoodputGuard()
    # Speculating steps of the flapping run: 74 tokens in 4.5 ms (16.4 tok/ms against 20 pipelined).
    step = feed(guard, 0, N - 1, 74, 0.0045)
    assert not guard.blocks(32, step) and guard.num_blocks_total == 0  # too few samples: no judgement yet
    step = feed(guard, step, 1, 74, 0.0045)
    assert guard.blocks(32, step) and guard.blocks(63, step)  # its bucket: 32-63
    assert not guard.blocks(31, step) and not guard.blocks(1, step)
    assert guard.num_blocks_total == 1 and "blocked" in guard.describe(step)


def test_does_not_block_where_speculation_pays_or_is_within_the_margin():
    guard = GoodputGuard()
    step = feed(guard, 0, 20, 108, 0.0052)  # always on at acceptance 0.6: 20.8 tok/ms, 1.04x
    step = feed(guard, step, 20, 32 * 5, 0.0045)  # copy text: 35.6 tok/ms
    # just inside the margin: 1 - MARGIN / 2 of pipelined goodput
    feed(guard, step, 20, 32, PIPELINED_STEP / (1 - MARGIN / 2))
    assert guard.num_blocks_total == 0 and not guard.blocks(32, step + 100)


def test_a_block_lasts_its_backoff_then_speculation_is_judged_afresh_and_blocks_grow():
    guard = GoodputGuard()
    step = feed(guard, 0, N, 32, 0.0024)  # synchronous steps without gain (transitions): 13 tok/ms
    assert guard.blocks(32, step)
    until = step - 1 + MIN_BLOCK  # blocked at the step that judged
    assert guard.blocks(32, until - 1) and not guard.blocks(32, until)
    # While blocked, synchronous steps (a check's, say) are not speculation's: not counted.
    for s in range(step, step + 10):
        guard.observe(32, False, 32, 0.01, s)
    assert guard.num_blocks_total == 1
    # After it, speculation is judged on fresh samples only (N of them) ...
    step = until
    for i in range(N - 1):
        guard.observe(32, False, 32, 0.0024, step + i)
        assert guard.num_blocks_total == 1
    step += N - 1
    step = feed(guard, step, 1, 32, 0.0024)
    assert guard.num_blocks_total == 2 and guard.blocks(32, step - 1 + 2 * MIN_BLOCK - 1)  # twice as long
    assert not guard.blocks(32, step - 1 + 2 * MIN_BLOCK)
    # Blocks grow up to MAX_BLOCK ...
    for _ in range(8):
        step = guard._buckets[6].blocked_until
        step = feed(guard, step, N, 32, 0.0024)
    assert guard._buckets[6].block == MAX_BLOCK
    # ... and go back to the shortest once speculation is found to pay.
    step = guard._buckets[6].blocked_until
    feed(guard, step, N, 160, 0.0045)
    assert guard._buckets[6].block == MIN_BLOCK and not guard.blocks(32, step + 20)


def test_a_one_off_slow_step_does_not_block_speculation_that_pays():
    """A draft model's first pass over a whole prompt (or a first-use compile) is one slow synchronous
    step: it counts as MAX_SAMPLE_STEPS pipelined steps at most."""
    guard = GoodputGuard()
    for step in range(N):
        guard.observe(32, True, 32, PIPELINED_STEP, step)
    guard.observe(32, False, 32, 0.5, N)  # the first speculating step: a 500 ms catch-up (a compile)
    for i in range(N):
        guard.observe(32, False, 32 * 4, 0.0035, N + 1 + i)  # then speculation at 1.8x
    assert guard.num_blocks_total == 0
    uncapped = GoodputGuard()  # (the same steps, each counted in full, would have blocked it)
    for i, seconds in enumerate([0.5] + [0.0035] * N):
        uncapped._bucket(32).synchronous.add(32 * 4 if i else 32, seconds)
    assert uncapped._bucket(32).synchronous.per_second() < guard._bucket(32).pipelined.per_second()


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_a_blocked_engine_proposes_nothing_checks_nothing_and_pipelines(tiny_model, monkeypatch, method):
    """With every batch size blocked, requests that the prior switches on are switched off by the
    batch-level check before any draft, checks (which could only switch a request on) are skipped,
    nearly every step runs pipelined, and the greedy text is the plain engine's."""
    from infergrid.worker.engine.llm_engine import LLMEngine

    monkeypatch.setenv("INFERGRID_SPEC_DECODE_ADAPTIVE", "1")
    monkeypatch.setattr(GoodputGuard, "blocks", lambda self, batch_size, step: True)
    spec = dict(speculative_method=method, num_speculative_tokens=3)
    if method == "draft":
        spec["draft_model"] = tiny_model("llama")  # a perfect draft: only the guard stops it
    kwargs = dict(dtype="float32", max_model_len=256, max_num_seqs=8, block_size=8)
    llm = LLM(tiny_model("llama"), **kwargs, **spec)
    decisions: list[bool] = []
    can_pipeline = LLMEngine._can_pipeline
    monkeypatch.setattr(LLMEngine, "_can_pipeline", lambda self: decisions.append(can_pipeline(self)) or decisions[-1])
    prompts = ["Hello, how are you", "Once upon a time there", "What is two plus", "The quick brown fox"]
    params = SamplingParams(temperature=0.0, max_tokens=70, ignore_eos=True)
    outs = llm.generate(prompts, params)
    plain = LLM(tiny_model("llama"), **kwargs).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    decoder = llm.llm_engine.spec_decoder
    assert llm.llm_engine.get_stats().spec_decode_num_drafts_total == 0
    assert decoder.num_checks_total == 0 and not decoder.adaptive.any_on
    assert sum(decisions) >= len(decisions) - 3  # (the steps right after the new requests' first decisions)


def test_the_engine_feeds_the_guard_every_decode_step_with_what_it_emitted(tiny_model, monkeypatch):
    """A random draft priced as cheap is tried (synchronous steps), then switched off (pipelined
    steps): the guard sees both kinds, with the tokens each step emitted and its finish-to-finish time."""
    from infergrid.worker.spec_decode.cost_model import StepCostModel

    monkeypatch.setenv("INFERGRID_SPEC_DECODE_ADAPTIVE", "1")
    monkeypatch.setattr(StepCostModel, "draft_token_cost", lambda self, batch_size, measured=True: 0.1)
    seen: list[tuple[int, bool, int, float]] = []
    observe = GoodputGuard.observe
    monkeypatch.setattr(GoodputGuard, "observe", lambda self, b, p, n, s, step: seen.append((b, p, n, s))
                        or observe(self, b, p, n, s, step))
    llm = LLM(tiny_model("llama"), dtype="float32", max_model_len=256, max_num_seqs=8, block_size=8,
              speculative_method="draft", num_speculative_tokens=3, draft_model=tiny_model("llama_draft"))
    prompts = ["Hello, how are you", "Once upon a time there", "What is two plus"]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
    assert {p for _, p, _, _ in seen} == {True, False}
    assert all(b == 3 and n >= b and s > 0 for b, _, n, s in seen)
    # every decode step but the first (after the prefill step, no decode step before it to measure from)
    # ... and a step emits what the requests gained: 60 tokens each, the first from the prefill step
    assert sum(n for _, _, n, _ in seen) == 3 * 59 - 3
    assert len(seen) == llm.llm_engine.get_stats().num_steps_total - 2
