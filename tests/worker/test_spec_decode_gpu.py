"""Speculative decoding on CUDA: verification batches replay the multi-token CUDA graphs, the draft
model's passes replay its own graphs, and greedy output stays identical to speculation off.
Run on a GPU machine: `pytest -m gpu tests/worker/test_spec_decode_gpu.py -s`."""

from __future__ import annotations

import pytest
import torch

from infergrid.worker import LLM, SamplingParams
from infergrid.worker.spec_decode import guard as spec_guard

pytestmark = pytest.mark.gpu

PROMPTS = ["Hello, how are you", "one, two, three, four, one, two, three, four, one, two,",
           "The quick brown fox", "Once upon a time there"]
ARGS = dict(dtype="float32", max_model_len=256, max_num_seqs=8, block_size=16)


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device"


@pytest.mark.parametrize("method", ["ngram", "draft", "draft-fp8"])
def test_greedy_identical_with_cuda_graphs(tiny_llama, method, monkeypatch):
    monkeypatch.setattr(spec_guard, "MIN_MEAN_ACCEPTED", 0.0)  # always k drafts
    params = [SamplingParams(temperature=0.0, max_tokens=40 + 7 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    expected = [o.outputs[0].token_ids for o in LLM(tiny_llama, **ARGS).generate(PROMPTS, params)]
    spec = dict(speculative_method=method.split("-")[0], num_speculative_tokens=3)
    if method.startswith("draft"):
        spec["draft_model"] = tiny_llama
    if method == "draft-fp8":  # the draft's LM head in FP8 (torch._scaled_mm): its drafts may differ, not the output
        spec["draft_lm_head_dtype"] = "fp8"
    llm = LLM(tiny_llama, **ARGS, **spec)
    outs = llm.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in outs] == expected
    runner = llm.llm_engine.model_runner
    assert runner.multi_token_graphs is not None and runner.multi_token_graphs.num_replays > 0
    stats = llm.llm_engine.get_stats()
    assert stats.spec_decode_num_accepted_tokens_total > 0
    if method.startswith("draft"):  # a request's first proposal replays the loop graph (passes 2..k); the later
        # ones are made ahead, all k passes in one replay (ahead_graph.py)
        decoder = llm.llm_engine.spec_decoder
        draft = decoder.proposer.model
        assert draft.loop_graphs.num_replays > 0 and draft.ahead_graphs.num_replays > 0
        assert decoder.proposer.num_ahead_proposals_total > 0
        assert stats.spec_decode_num_accepted_tokens_total >= 0.9 * stats.spec_decode_num_draft_tokens_total
        if method == "draft-fp8":
            assert decoder.proposer.runner.model.lm_head.use_fp8_gemm


def test_sampled_requests_with_a_draft_run_on_cuda(tiny_llama, tiny_model, monkeypatch):
    # Always k drafts: the random draft's requests would cool down.
    monkeypatch.setattr(spec_guard, "MIN_MEAN_ACCEPTED", 0.0)
    llm = LLM(tiny_llama, **ARGS, speculative_method="draft", num_speculative_tokens=3,
              draft_model=tiny_model("llama_draft"))
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=32, seed=5, ignore_eos=True)
    first = llm.generate(PROMPTS, params)
    again = llm.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]
    assert all(len(o.outputs[0].token_ids) == 32 for o in first)
