"""Async scheduling: step N+1 scheduled and launched before step N's tokens are known.

Scheduler level: placeholders, max_tokens, EOS and preemption while a token is in flight. Engine
level: every output (greedy, seeded sampling, logprobs, stop strings, penalties, preemption, n > 1)
is identical with async scheduling on and off, and the engine really runs one step ahead.
"""

from __future__ import annotations

import pytest
from test_scheduler import EOS, make_request, make_scheduler, plan

from infergrid.worker import LLM, SamplingParams
from infergrid.worker.engine.request import RequestStatus
from infergrid.worker.engine.scheduler_output import PLACEHOLDER_TOKEN_ID


def test_next_step_decodes_a_placeholder_until_max_tokens():
    sched = make_scheduler()
    assert sched.async_scheduling
    req = make_request("a", num_prompt=6, max_tokens=3)
    sched.add_request(req)
    out1 = sched.schedule()
    assert plan(out1) == [("a", 6)] and req.num_output_placeholders == 1
    out2 = sched.schedule()  # step 1 still running: decode its token's position blind
    (s,) = out2.scheduled
    assert (s.num_computed_tokens, s.token_ids, s.needs_sample) == (6, [PLACEHOLDER_TOKEN_ID], True)
    assert sched.update_from_output(out1, {"a": [7]}) == [] and req.output_token_ids == [7]
    out3 = sched.schedule()
    assert out3.scheduled[0].token_ids == [PLACEHOLDER_TOKEN_ID] and out3.scheduled[0].num_computed_tokens == 7
    assert sched.update_from_output(out2, {"a": [8]}) == []
    assert sched.schedule().is_empty  # the third and last token is in flight: nothing more to run
    assert sched.update_from_output(out3, {"a": [9]}) == [req]
    assert req.output_token_ids == [7, 8, 9] and req.finish_reason == "length"
    assert req.num_output_placeholders == 0 and sched.make_stats().num_used_blocks == 0


def test_eos_in_flight_drops_the_step_after_it():
    sched = make_scheduler()
    req = make_request("a", num_prompt=6, max_tokens=8)
    sched.add_request(req)
    out1 = sched.schedule()
    out2 = sched.schedule()
    assert sched.update_from_output(out1, {"a": [EOS]}) == [req]
    assert req.status == RequestStatus.FINISHED_STOPPED and sched.make_stats().num_used_blocks == 0
    assert sched.update_from_output(out2, {"a": [8]}) == []  # computed blind, dropped
    assert req.output_token_ids == [EOS]
    assert sched.schedule().finished_req_ids == {"a"}


def _preempt_b_with_a_token_in_flight():
    """a and b fill the 4 usable blocks of a tiny pool, pipelined; the next schedule() preempts b
    while its last token is in flight. Returns (sched, a, b, the step in flight, the new step)."""
    sched = make_scheduler(num_blocks=5, enable_prefix_caching=False)  # 4 usable blocks of 4 tokens
    a = make_request("a", num_prompt=4, max_tokens=8, arrival=0.0)
    b = make_request("b", num_prompt=4, max_tokens=8, arrival=1.0)
    sched.add_request(a)
    sched.add_request(b)
    prev = sched.schedule()
    for token in range(10, 14):  # a and b each fill their two blocks (positions 0..7)
        out = sched.schedule()
        sched.update_from_output(prev, {"a": [token], "b": [token + 100]})
        prev = out
    out = sched.schedule()  # both need a third block: b goes, with its last token still in flight
    return sched, a, b, prev, out


def test_preempted_while_its_token_is_in_flight():
    sched, a, b, prev, out = _preempt_b_with_a_token_in_flight()
    assert out.preempted_req_ids == ["b"] and plan(out) == [("a", 1)]
    assert b.status == RequestStatus.PREEMPTED and b.num_output_placeholders == 1
    sched.update_from_output(prev, {"a": [14], "b": [114]})
    assert b.output_token_ids == [110, 111, 112, 113, 114] and b.num_output_placeholders == 0
    assert b.status == RequestStatus.PREEMPTED and sched.waiting == [b]
    sched.update_from_output(out, {"a": [EOS]})  # a ends, b comes back by recompute of every known token
    out = sched.schedule()
    (s,) = out.scheduled
    assert s.request_id == "b" and s.token_ids == b.all_token_ids and PLACEHOLDER_TOKEN_ID not in s.token_ids


def test_eos_of_a_preempted_request_finishes_it_in_the_waiting_queue():
    sched, a, b, prev, out = _preempt_b_with_a_token_in_flight()
    assert out.preempted_req_ids == ["b"]
    assert sched.update_from_output(prev, {"a": [14], "b": [EOS]}) == [b]
    assert b.finish_reason == "stop" and sched.waiting == [] and sched.running == [a]


# -- the engine: async on and off give the same outputs --------------------------------------------

PROMPTS = ["Hello, how are you", "The quick brown fox", "Once upon a time there", "What is two plus",
           "A long time ago in a galaxy", "To be or not to be"]


def _outputs(llm: LLM, params: list[SamplingParams]) -> list[tuple]:
    outs = llm.generate(PROMPTS, params)
    return [
        (c.token_ids, c.text, c.finish_reason, c.stop_reason,
         None if c.logprobs is None else [{t: round(lp.logprob, 4) for t, lp in d.items()} for d in c.logprobs])
        for o in outs for c in o.outputs
    ]


MIXED = [
    SamplingParams(temperature=0.0, max_tokens=24),
    SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=7, logprobs=3),
    SamplingParams(temperature=0.0, max_tokens=30, stop=["e"], min_tokens=2),
    SamplingParams(temperature=0.8, max_tokens=16, seed=3, presence_penalty=0.5, repetition_penalty=1.2),
    SamplingParams(temperature=1.0, max_tokens=12, n=2, seed=11),
    SamplingParams(temperature=0.0, max_tokens=1),
]


@pytest.mark.parametrize("pool", [None, 25], ids=["roomy", "preempting"])
def test_async_and_sync_engines_give_identical_outputs(tiny_llama, pool):
    kwargs = dict(dtype="float32", max_model_len=128, max_num_seqs=8, block_size=4, num_gpu_blocks_override=pool)
    on = LLM(tiny_llama, async_scheduling=True, **kwargs)
    off = LLM(tiny_llama, async_scheduling=False, **kwargs)
    assert on.llm_engine.scheduler.async_scheduling and not off.llm_engine.scheduler.async_scheduling
    assert _outputs(on, MIXED) == _outputs(off, MIXED)
    on_stats, off_stats = on.llm_engine.get_stats(), off.llm_engine.get_stats()
    assert on_stats.generation_tokens_total == off_stats.generation_tokens_total
    assert on_stats.num_used_blocks == 0
    if pool is not None:
        assert on_stats.num_preemptions_total > 0


def test_engine_runs_one_step_ahead(tiny_llama):
    llm = LLM(tiny_llama, dtype="float32", max_model_len=128, block_size=4)
    engine = llm.llm_engine
    engine.add_request("r", "Hello there", SamplingParams(temperature=0.0, max_tokens=3))
    assert engine.step() == []  # the prefill is launched; its token comes with the next step
    runner = engine.model_runner
    assert runner._prev_sampled is not None and runner._prev_rows == {"r": 0}
    (out,) = engine.step()  # decode 1 launched, the prefill's token out
    assert len(out.outputs[0].token_ids) == 1 and not out.finished
    (out,) = engine.step()
    assert len(out.outputs[0].token_ids) == 2
    (out,) = engine.step()  # nothing left to launch: the last token comes out now
    assert len(out.outputs[0].token_ids) == 3 and out.finished
    assert not engine.has_unfinished_requests()


def _record_proposals(llm: LLM, monkeypatch) -> list[tuple[int, bool, int]]:
    """Per proposal step of the engine: (requests that sampled, pipelined, requests given drafts)."""
    decoder = llm.llm_engine.spec_decoder
    record: list[tuple[int, bool, int]] = []
    propose = decoder.propose

    def recorded(scheduler_output, sampled_token_ids, pipelined=False):
        drafts = propose(scheduler_output, sampled_token_ids, pipelined)
        record.append((len(sampled_token_ids), pipelined, len(drafts)))
        return drafts

    monkeypatch.setattr(decoder, "propose", recorded)
    return record


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculative_engine_pipelines_while_every_request_cools_down(tiny_model, monkeypatch, method):
    """A random draft (and n-gram lookups on text that rarely repeats) fail: the requests cool down
    together (spec_decode/guard.py) and meanwhile the steps run ahead of their tokens; the greedy text
    is the plain engine's."""
    from infergrid.worker.engine.llm_engine import LLMEngine

    spec = dict(speculative_method=method, num_speculative_tokens=3)
    if method == "draft":
        spec["draft_model"] = tiny_model("llama_draft")
    kwargs = dict(dtype="float32", max_model_len=256, max_num_seqs=8, block_size=8)
    llm = LLM(tiny_model("llama"), **kwargs, **spec)
    decisions: list[bool] = []
    can_pipeline = LLMEngine._can_pipeline
    monkeypatch.setattr(LLMEngine, "_can_pipeline", lambda self: decisions.append(can_pipeline(self)) or decisions[-1])
    record = _record_proposals(llm, monkeypatch)
    params = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
    spec_tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    plain = LLM(tiny_model("llama"), **kwargs)
    assert spec_tokens == [o.outputs[0].token_ids for o in plain.generate(PROMPTS, params)]
    stats = llm.llm_engine.get_stats()
    assert stats.spec_decode_num_drafts_total > 0  # it did speculate (first tries)
    assert 0.4 * len(decisions) < sum(decisions) < len(decisions)
    assert not any(num_drafted for _, pipelined, num_drafted in record if pipelined)


def test_batch_over_the_cutoff_runs_pipelined_without_drafts(tiny_model, monkeypatch):
    """speculative_disable_by_batch_size=2 with 4 requests of different lengths: while more than 2 sample,
    no drafts and every step after the first pipelined; once 2 are left, drafts; greedy output is the
    plain engine's."""
    kwargs = dict(dtype="float32", max_model_len=256, max_num_seqs=8, block_size=8)
    llm = LLM(tiny_model("llama"), **kwargs, speculative_method="draft", num_speculative_tokens=3,
              draft_model=tiny_model("llama"), speculative_disable_by_batch_size=2)
    record = _record_proposals(llm, monkeypatch)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (20, 24, 60, 70)]
    spec_tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:4], params)]
    assert spec_tokens == [o.outputs[0].token_ids for o in LLM(tiny_model("llama"), **kwargs).generate(
        PROMPTS[:4], params)]
    over = [r for r in record if r[0] > 2]
    under = [r for r in record if r[0] <= 2]
    assert len(over) >= 15 and not any(num_drafted for _, _, num_drafted in over)
    assert sum(pipelined for _, pipelined, _ in over) >= len(over) - 1  # (the first step: an idle engine's)
    assert sum(num_drafted for _, _, num_drafted in under) >= 5  # 2 left: they speculate (a perfect draft)
    assert llm.llm_engine.get_stats().spec_decode_num_accepted_tokens_total > 0
