"""Structured output on CUDA: the bitmask goes through pinned staging and xgrammar's Triton kernel,
decode runs in CUDA graphs, pipelined steps and speculation as on CPU.
Run on a GPU machine: `pytest -m gpu tests/worker/test_structured_output_gpu.py`."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from test_structured_output import SCHEMA, json_params

from infergrid.worker import LLM, SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device"


@pytest.mark.parametrize("spec", [{}, {"speculative_method": "ngram", "num_speculative_tokens": 3}],
                         ids=["plain", "ngram"])
def test_cuda_constrained_outputs_follow_the_schema(tiny_llama, spec):
    llm = LLM(tiny_llama, dtype="float32", max_model_len=512, max_num_seqs=32, gpu_memory_utilization=0.3, **spec)
    free = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    params = [json_params(temperature=1.0) if i % 2 else free for i in range(64)]
    outs = llm.generate(["Tell me about a pet"] * 64, params)
    for i, out in enumerate(outs):
        c = out.outputs[0]
        if i % 2:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), SCHEMA)
        else:
            assert len(c.token_ids) == 40
    alone = llm.generate(["Tell me about a pet"], free)[0].outputs[0].token_ids
    assert outs[0].outputs[0].token_ids == alone  # unconstrained rows are untouched by the mask
