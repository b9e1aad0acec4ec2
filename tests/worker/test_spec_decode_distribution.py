"""End to end on the tiny model at temperature 1: with a draft model that agrees only part of the
time, the second token (the first one that goes through verification) has exactly the target's
distribution. The reference is computed with Hugging Face transformers (the project's oracle), and
the same G-test catches an engine whose verifier always accepts."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from spec_stats import g_test_pvalue

from infergrid.worker import LLM, SamplingParams
from infergrid.worker.sample import rejection_sampler

NUM_SAMPLES = 20_000
NUM_BROKEN_SAMPLES = 2_000
PROMPT = "Hi"
# One draft after the first token (k = min(2, max_tokens - 1 - 1)); t3 is a bonus or a plain sample.
PARAMS = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, skip_special_tokens=False)


@pytest.fixture(scope="module")
def perturbed_draft(tiny_model, tmp_path_factory) -> str:
    """The target plus N(0, 0.05) noise on every matrix: same tokenizer, ~60% acceptance."""
    from safetensors.torch import load_file, save_file

    src = tiny_model("llama")
    out = str(tmp_path_factory.mktemp("draft") / "perturbed")
    shutil.copytree(src, out)
    gen = torch.Generator().manual_seed(0)
    weights = load_file(os.path.join(src, "model.safetensors"))
    noisy = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.dim() > 1 else v for k, v in weights.items()}
    save_file(noisy, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def reference(tiny_model) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(prompt ids, P(t1), P(t2) = sum over t1 of P(t1) P(t2 | t1)) from transformers in float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model("llama")
    ids = AutoTokenizer.from_pretrained(path)(PROMPT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    vocab = model.config.vocab_size
    with torch.no_grad():
        p1 = model(torch.tensor([ids])).logits[0, -1].softmax(-1)
        batch = torch.cat([torch.tensor([ids]).expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        p2_given_t1 = model(batch).logits[:, -1].softmax(-1)
    return ids, p1, p1 @ p2_given_t1


def _sample(target: str, draft: str, prompt_ids: list[int], n: int) -> tuple[torch.Tensor, float]:
    llm = LLM(target, dtype="float32", max_model_len=16, block_size=8, max_num_seqs=1024,
              max_num_batched_tokens=4096, enable_prefix_caching=False,
              speculative_method="draft", num_speculative_tokens=2, draft_model=draft,
              speculative_disable_by_batch_size=1024)  # (the whole batch speculates)
    outs = llm.generate([prompt_ids] * n, PARAMS)
    stats = llm.llm_engine.get_stats()
    assert stats.spec_decode_num_drafts_total == n  # every second token went through verification
    tokens = torch.tensor([o.outputs[0].token_ids for o in outs])
    return tokens, stats.spec_decode_num_accepted_tokens_total / stats.spec_decode_num_draft_tokens_total


def test_verified_token_has_the_target_distribution(tiny_model, perturbed_draft, reference):
    ids, p1, p2 = reference
    tokens, rate = _sample(tiny_model("llama"), perturbed_draft, ids, NUM_SAMPLES)
    vocab = p1.numel()
    assert 0.3 < rate < 0.9  # both the accept and the residual paths are exercised
    assert g_test_pvalue(torch.bincount(tokens[:, 0], minlength=vocab), p1) > 0.01
    assert g_test_pvalue(torch.bincount(tokens[:, 1], minlength=vocab), p2) > 0.01


def test_same_test_catches_an_always_accept_verifier(tiny_model, perturbed_draft, reference, monkeypatch):
    real = rejection_sampler.rejection_sample

    def always_accept(target_probs, draft_token_ids, is_greedy, generators=None, *args, **kwargs):
        tokens, _ = real(target_probs, draft_token_ids, is_greedy, generators, *args, **kwargs)
        has_draft = draft_token_ids >= 0
        return torch.where(has_draft, draft_token_ids, tokens), has_draft

    monkeypatch.setattr(rejection_sampler, "rejection_sample", always_accept)
    ids, p1, p2 = reference
    tokens, rate = _sample(tiny_model("llama"), perturbed_draft, ids, NUM_BROKEN_SAMPLES)
    assert rate == 1.0
    assert g_test_pvalue(torch.bincount(tokens[:, 1], minlength=p2.numel()), p2) < 0.01
