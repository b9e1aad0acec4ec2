"""Our engine on real weights (SmolLM2-135M-Instruct, float32, CPU) against Hugging Face transformers:
greedy tokens equal and logprobs close for 16 varied chat prompts (64 new tokens each, past the end of
the turn too: ignore_eos); prefix caching, n-gram speculation and tensor parallelism leave the greedy
tokens unchanged; n-gram acceptance on text that repeats its prompt is measured and printed.

The model is converted once per machine (the `smollm2` fixture: the on-disk model cache); the
transformers reference and our baseline are computed once per module.
"""

from __future__ import annotations

import pytest
import torch

from infergrid.testbed.real_prompts import CHATS, SUMMARY_CHAT
from infergrid.worker import LLM, SamplingParams
from infergrid.worker.spec_decode import guard as spec_guard
from infergrid.worker.tokenizer import apply_chat_template

MAX_NEW_TOKENS = 64
ENGINE_ARGS = dict(dtype="float32", device="cpu", max_model_len=1024, max_num_seqs=16)
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True, logprobs=5)
# transformers' top-2 logprobs closer than this are a tie float32 rounding may break either way
# (smallest gap seen: 1.8e-4, against differences of 3e-5); anywhere else the tokens must be equal.
TIE = 1e-3
NUM_TP_PROMPTS = 4
TP_TOKENS = 24

pytestmark = pytest.mark.slow  # ~3 min on the 2-core CI machine, model conversion (once per machine) aside


@pytest.fixture(scope="module")
def llm(smollm2: str) -> LLM:
    return LLM(smollm2, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def prompts(llm: LLM) -> list[list[int]]:
    return [apply_chat_template(llm.tokenizer, chat) for chat in CHATS]


@pytest.fixture(scope="module")
def baseline(llm: LLM, prompts: list[list[int]]):
    """Our greedy outputs for the 16 chats (all scheduled together)."""
    return llm.generate(prompts, GREEDY)


@pytest.fixture(scope="module")
def hf_model(smollm2: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # full lengths, like ignore_eos
    return model


@pytest.fixture(scope="module")
def hf_logprobs(hf_model, prompts: list[list[int]], baseline) -> list[torch.Tensor]:
    """transformers' log-softmaxed logits at each of our generated positions, from one forward pass
    over prompt + our tokens per chat (teacher forcing: 16 passes instead of 16 x 64 decode steps)."""
    results = []
    with torch.no_grad():
        for prompt, out in zip(prompts, baseline, strict=True):
            tokens = out.outputs[0].token_ids
            logits = hf_model(torch.tensor([prompt + tokens])).logits[0]
            results.append(logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)].float().log_softmax(-1))
    return results


def test_the_model_answers_a_factual_question(llm: LLM) -> None:
    out = llm.chat(CHATS[0], SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS))[0].outputs[0]
    print(f"Q: {CHATS[0][0]['content']!r} -> A: {out.text!r}")
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # the model ends its turn with <|im_end|>


def test_greedy_tokens_equal_transformers_and_logprobs_close(baseline, hf_logprobs) -> None:
    """At every generated position transformers' argmax is our token, so (by induction over the
    positions) transformers' greedy decoding of each chat yields exactly our tokens (a position where
    its top two are within TIE may pick either); our top-5 logprobs are transformers' within 2e-3."""
    max_diff, num_ties, num_flips = 0.0, 0, 0
    for i, (out, ref_logprobs) in enumerate(zip(baseline, hf_logprobs, strict=True)):
        completion = out.outputs[0]
        assert len(completion.token_ids) == MAX_NEW_TOKENS == len(completion.logprobs)
        top2 = ref_logprobs.topk(2)
        for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
            is_tie = float(top2.values[step, 0] - top2.values[step, 1]) < TIE
            num_ties += is_tie
            if token != int(top2.indices[step, 0]):
                assert is_tie and token == int(top2.indices[step, 1]), f"chat {i} step {step}: {completion.text!r}"
                num_flips += 1
            ref = ref_logprobs[step]
            top6 = ref.topk(6)
            is_fifth_tie = float(top6.values[4] - top6.values[5]) < TIE
            assert set(entry) == set(top6.indices[:5].tolist()) or is_fifth_tie, f"chat {i} step {step}"
            for tid, lp in entry.items():
                max_diff = max(max_diff, abs(lp.logprob - ref[tid].item()))
    print(f"{len(baseline)} chats x {MAX_NEW_TOKENS} tokens: largest |logprob - transformers'| {max_diff:.2e}; "
          f"{num_ties} near-ties (top two within {TIE}), {num_flips} resolved the other way")
    assert max_diff < 2e-3
    assert num_flips <= 1


@pytest.mark.parametrize("chat", [0, 13])
def test_transformers_generate_gives_our_tokens(hf_model, prompts, baseline, chat) -> None:
    """The same, literally: transformers' own greedy `generate` (with its KV cache)."""
    ids = torch.tensor([prompts[chat]])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                                do_sample=False, pad_token_id=2)
    assert out[0, ids.shape[1]:].tolist() == baseline[chat].outputs[0].token_ids


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_prefix_caching_keeps_the_greedy_tokens(smollm2, prompts, baseline) -> None:
    """Half the chats (the default system prompt is shared by most), twice: the second wave hits."""
    llm = LLM(smollm2, **ENGINE_ARGS, enable_prefix_caching=True)
    half = slice(0, len(prompts), 2)
    first = llm.generate(prompts[half], GREEDY)
    second = llm.generate(prompts[half], GREEDY)
    assert sum(o.num_cached_tokens for o in second) > sum(len(p) for p in prompts[half]) // 2
    assert tokens(first) == tokens(baseline[half])
    assert tokens(second) == tokens(baseline[half])


def test_ngram_speculation_keeps_the_greedy_tokens(smollm2, prompts, baseline) -> None:
    llm = LLM(smollm2, **ENGINE_ARGS, speculative_method="ngram", num_speculative_tokens=4)
    assert tokens(llm.generate(prompts, GREEDY)) == tokens(baseline)
    assert llm.llm_engine.get_stats().spec_decode_num_draft_tokens_total > 0


def test_ngram_acceptance_on_text_that_repeats_the_prompt(smollm2, monkeypatch) -> None:
    """Drafts proposed at every step (no cool-down) so the number is the acceptance itself."""
    monkeypatch.setattr(spec_guard, "MIN_MEAN_ACCEPTED", 0.0)
    params = SamplingParams(temperature=0.0, max_tokens=128)
    plain = LLM(smollm2, **ENGINE_ARGS)
    prompt = apply_chat_template(plain.tokenizer, SUMMARY_CHAT)
    expected = plain.generate([prompt], params)[0].outputs[0]
    del plain
    spec = LLM(smollm2, **ENGINE_ARGS, speculative_method="ngram", num_speculative_tokens=4)
    got = spec.generate([prompt], params)[0].outputs[0]
    stats = spec.llm_engine.get_stats()
    acceptance = stats.spec_decode_num_accepted_tokens_total / stats.spec_decode_num_draft_tokens_total
    print(f"n-gram k=4 on a repeat-the-text chat: {stats.spec_decode_num_accepted_tokens_total}/"
          f"{stats.spec_decode_num_draft_tokens_total} drafts accepted = {acceptance:.2f}, "
          f"{len(got.token_ids)} tokens in {stats.spec_decode_num_drafts_total} verify steps; "
          f"per position {stats.spec_decode_num_accepted_tokens_per_pos}")
    assert got.token_ids == expected.token_ids
    assert acceptance > 0.5


def test_tensor_parallel_refuses_2_and_keeps_the_greedy_text_at_3(smollm2, prompts, baseline) -> None:
    """9 query heads and 3 KV heads: TP=2 cannot split them (clear error); TP=3 over gloo can."""
    with pytest.raises(ValueError, match="tensor_parallel_size 2 does not divide the model's num_attention_heads 9"):
        LLM(smollm2, **ENGINE_ARGS, tensor_parallel_size=2)
    params = SamplingParams(temperature=0.0, max_tokens=TP_TOKENS, ignore_eos=True)
    expected = [o.outputs[0].token_ids[:TP_TOKENS] for o in baseline[:NUM_TP_PROMPTS]]
    llm = LLM(smollm2, **ENGINE_ARGS, tensor_parallel_size=3)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts[:NUM_TP_PROMPTS], params)]
    finally:
        llm.llm_engine.shutdown()
    assert got == expected
