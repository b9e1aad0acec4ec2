"""Structured output in the engine: grammar compilation and its cache, the per-request matchers and
the step's token bitmask (drafts included), the sampler's masking, and whole runs on a tiny random
model (random weights: only the grammar makes the output valid), with and without speculation."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from infergrid.worker import LLM, SamplingParams
from infergrid.worker.sample.sampler import Sampler, SamplingMetadata
from infergrid.worker.structured_output.grammar import GrammarCompiler, GrammarError, no_control_characters
from infergrid.worker.structured_output.manager import StructuredOutputManager
from infergrid.worker.structured_output.params import StructuredOutputsParams
from infergrid.worker.tokenizer import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                   "verified": {"type": "boolean"}},
                  "required": ["city", "verified"], "additionalProperties": False},
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
}
BASE = dict(dtype="float32", max_model_len=512, max_num_seqs=16, block_size=8)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(tiny_llama)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def json_params(**kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=kwargs.pop("max_tokens", 300),
                          structured_outputs=StructuredOutputsParams(json=SCHEMA), **kwargs)


def test_params_need_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])
    assert StructuredOutputsParams(json={"b": 1, "a": 2}).cache_key() == StructuredOutputsParams(
        json='{"a": 2, "b": 1}').cache_key()


def test_compile_is_cached_and_bad_constraints_name_the_problem(compiler):
    first, seconds = compiler.compile(StructuredOutputsParams(json=SCHEMA))
    assert seconds is not None and seconds >= 0
    again, seconds_again = compiler.compile(StructuredOutputsParams(json=json.dumps(SCHEMA, sort_keys=True)))
    assert again is first and seconds_again is None
    with pytest.raises(GrammarError, match="not valid JSON"):
        compiler.compile(StructuredOutputsParams(json="{bad"))
    with pytest.raises(GrammarError, match='invalid JSON schema: Unsupported type "objectx"'):
        compiler.compile(StructuredOutputsParams(json={"type": "objectx"}))
    with pytest.raises(GrammarError, match="invalid regex: .*parenthesis"):
        compiler.compile(StructuredOutputsParams(regex="a("))
    with pytest.raises(GrammarError, match='invalid grammar: .*"foo" is not defined'):
        compiler.compile(StructuredOutputsParams(grammar="root ::= foo"))


def test_length_limited_strings_exclude_control_characters():
    strict = r'[^\0-\x1f\"\\\r\n\uD800-\uDFFF]'
    assert no_control_characters(r'a ::= [^\"\\\r\n] | [^\0-\x1f\"\\\r\n]') == f"a ::= {strict} | {strict}"


def _allowed(bitmask: torch.Tensor, row: int, vocab_size: int) -> set[int]:
    logits = torch.zeros(1, vocab_size)
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask[row : row + 1].clone(), vocab_size=vocab_size)
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def test_bitmask_rows_follow_the_grammar_and_drafts_it_refuses_end_the_mask(compiler, tokenizer):
    vocab = compiler.vocab_size
    manager = StructuredOutputManager(compiler)
    assert manager.fill_bitmask([("free", [])]) is None  # nobody constrained: no bitmask at all
    manager.add_request("c", StructuredOutputsParams(choice=["yes", "no"]))
    assert manager.fill_bitmask([("free", [])]) is None  # constrained requests, but none in this step
    mask = manager.fill_bitmask([("free", []), ("c", [])])
    assert mask is not None and mask.shape[0] == 2
    assert _allowed(mask, 0, vocab) == set(range(vocab))
    first = _allowed(mask, 1, vocab)
    assert first and all("yes".startswith(t) or "no".startswith(t)
                         for t in (tokenizer.decode([i]) for i in first))
    y = tokenizer.convert_tokens_to_ids("y")
    e = tokenizer.convert_tokens_to_ids("e")
    z = tokenizer.convert_tokens_to_ids("z")
    # drafts "y", "z": row 0 allows y, row 1 is after "y" (allows e, not z); "z" is refused, so row 2
    # (after a refused draft: discarded by verification) is left open; the matcher is rolled back.
    mask = manager.fill_bitmask([("c", [y, z])])
    assert mask.shape[0] == 3
    assert y in _allowed(mask, 0, vocab)
    after_y = _allowed(mask, 1, vocab)
    assert e in after_y and z not in after_y
    assert _allowed(mask, 2, vocab) == set(range(vocab))
    assert _allowed(manager.fill_bitmask([("c", [])]), 0, vocab) == first  # rolled back
    manager.accept_tokens("c", [y])
    assert _allowed(manager.fill_bitmask([("c", [])]), 0, vocab) == after_y
    manager.remove_requests(["c"])
    assert not manager.has_requests


def test_sampler_masks_before_sampling():
    vocab = 64
    logits = torch.randn(4, vocab)
    logits[:, 5] = 100.0  # the unconstrained favourite
    bitmask = torch.full((4, 2), -1, dtype=torch.int32)
    bitmask[1] = 0
    bitmask[1, 0] = 1 << 7  # row 1: only token 7
    meta = SamplingMetadata(temperature=torch.tensor([0.0, 1.0, 1.0, 0.0]), all_greedy=False, token_bitmask=bitmask)
    out = Sampler()(logits.clone(), meta)
    assert out.sampled.tolist()[1] == 7
    assert out.sampled.tolist()[0] == 5 and out.sampled.tolist()[3] == 5


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, **BASE)


def test_sampled_outputs_follow_the_schema_and_end(llm):
    outs = llm.generate(["Tell me about a pet"] * 24, json_params(temperature=1.0, n=2))
    for out in outs:
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), SCHEMA)


def test_regex_choice_grammar_and_json_object(llm):
    regex = SamplingParams(temperature=1.0, max_tokens=20, structured_outputs=StructuredOutputsParams(
        regex=r"[0-9]{3}-[a-z]{2}"))
    choice = SamplingParams(temperature=1.0, max_tokens=20, structured_outputs=StructuredOutputsParams(
        choice=["yes", "no way"]))
    grammar = SamplingParams(temperature=1.0, max_tokens=20, structured_outputs=StructuredOutputsParams(
        grammar='root ::= "(" [a-c]+ ")"'))
    obj = SamplingParams(temperature=1.0, max_tokens=400, structured_outputs=StructuredOutputsParams(json_object=True))
    outs = llm.generate(["x"] * 16, [regex, choice, grammar, obj] * 4)
    for i, out in enumerate(outs):
        text = out.outputs[0].text
        if i % 4 == 3:  # (a free-form object's keys and values can run past max_tokens: a prefix then)
            assert text.startswith("{")
            assert out.outputs[0].finish_reason == "length" or isinstance(json.loads(text), dict)
            continue
        assert out.outputs[0].finish_reason == "stop", text
        if i % 4 == 0:
            assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text)
        elif i % 4 == 1:
            assert text in ("yes", "no way")
        else:
            assert re.fullmatch(r"\([a-c]+\)", text)


def test_unconstrained_requests_beside_constrained_ones_are_unchanged(llm):
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(["Once upon a time"], free)[0].outputs[0].token_ids
    mixed = llm.generate(["Once upon a time", "Tell me"], [free, json_params(temperature=0.0)])
    assert mixed[0].outputs[0].token_ids == alone


def test_pipelined_steps_give_the_same_constrained_output(tiny_llama):
    """With async scheduling a constrained request's previous step is finished between the next
    step's forward pass and its sampling (the bitmask needs its token): same tokens as without."""
    prompts = ["Tell me about a pet", "The quick brown fox", "Once upon a time"]
    params = [json_params(temperature=0.0), SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
              json_params(temperature=0.0)]
    sync = LLM(tiny_llama, **BASE, async_scheduling=False).generate(prompts, params)
    llm = LLM(tiny_llama, **BASE)
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in sync]
    assert llm.llm_engine.num_pipelined_steps_total > 20  # (the constrained steps were pipelined too)
    for i in (0, 2):
        jsonschema.validate(json.loads(outs[i].outputs[0].text), SCHEMA)


def test_outputs_of_the_step_in_flight_are_made_after_the_constrained_sampling(tiny_llama):
    """Between a constrained step's forward pass and its sampling only the previous step's tokens are
    applied (scheduler, grammar matchers); its outputs (detokenizing) wait until the sampling is launched."""
    llm = LLM(tiny_llama, **BASE)
    engine = llm.llm_engine
    inside, made_inside = [False], []
    execute, process = engine.model_executor.execute_model, engine.output_processor.process

    def spy_execute(*args, **kwargs):
        inside[0] = True
        try:
            return execute(*args, **kwargs)
        finally:
            inside[0] = False

    def spy_process(*args, **kwargs):
        made_inside.append(inside[0])
        return process(*args, **kwargs)

    engine.model_executor.execute_model, engine.output_processor.process = spy_execute, spy_process
    outs = llm.generate(["Tell me about a pet", "Once upon a time"], [json_params(temperature=0.0)] * 2)
    assert engine.num_pipelined_steps_total > 20 and len(made_inside) > 20
    assert not any(made_inside)
    for out in outs:
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)


@pytest.mark.parametrize("method", ["ngram", "draft=target"])
def test_speculation_keeps_greedy_constrained_output_and_grammar_refuses_drafts(tiny_llama, method):
    """A draft model equal to the target drafts the *unconstrained* argmax: wherever the grammar forbids
    it, the draft is refused, and the output equals the run without speculation."""
    prompts = ["Tell me about a pet", "The quick brown fox", "Once upon a time", "What is two plus"]
    params = [json_params(temperature=0.0), json_params(temperature=0.0),
              SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), json_params(temperature=0.0)]
    plain = LLM(tiny_llama, **BASE).generate(prompts, params)
    spec = dict(speculative_method="ngram", num_speculative_tokens=3) if method == "ngram" else dict(
        speculative_method="draft", num_speculative_tokens=3, draft_model=tiny_llama)
    llm = LLM(tiny_llama, **BASE, **spec)
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    for i in (0, 1, 3):
        jsonschema.validate(json.loads(outs[i].outputs[0].text), SCHEMA)
    stats = llm.llm_engine.get_stats()
    assert stats.spec_decode_num_draft_tokens_total > 0
    if method == "draft=target":  # (unconstrained, a draft equal to the target is always accepted)
        assert stats.spec_decode_num_accepted_tokens_total < stats.spec_decode_num_draft_tokens_total
