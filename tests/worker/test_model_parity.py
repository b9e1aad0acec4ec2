"""Our engine vs Hugging Face transformers on the same tiny random checkpoints (CPU, float32):
greedy tokens identical (plain, chunked prefill, forced preemption) and logits/logprobs close."""

from __future__ import annotations

import random

import pytest
import torch

from infergrid.worker import LLM, SamplingParams
from infergrid.worker.layers.attention import AttentionMetadata
from infergrid.worker.model_config import ModelConfig

NUM_PROMPTS = 16
MAX_NEW_TOKENS = 10
ARCHS = ["llama", "qwen2", "qwen3", "llama_untied", "llama3_rope"]


def make_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    """16 prompts of mixed lengths (1..70 tokens): BOS + random non-special ids."""
    rng = random.Random(seed)
    lengths = [1, 2, 3, 5, 8, 13, 16, 17, 21, 31, 32, 33, 40, 47, 64, 70]
    return [[0] + [rng.randrange(3, vocab_size) for _ in range(n - 1)] for n in lengths]


def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # compare full lengths (we pass ignore_eos)
    return model


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=2)
            results.append(out[0, len(prompt):].tolist())
    return results


@pytest.fixture(scope="module")
def hf_reference(tiny_model):
    """name -> (prompts, HF greedy continuations), computed once per module."""
    cache: dict[str, tuple[list[list[int]], list[list[int]]]] = {}

    def get(name: str):
        if name not in cache:
            path = tiny_model(name)
            prompts = make_prompts(ModelConfig.from_pretrained(path).vocab_size)
            cache[name] = (prompts, hf_greedy(hf_model(path), prompts, MAX_NEW_TOKENS))
        return cache[name]

    return get


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("name", ARCHS)
def test_greedy_matches_transformers(tiny_model, hf_reference, name):
    prompts, expected = hf_reference(name)
    llm = LLM(tiny_model(name), dtype="float32", max_model_len=128, max_num_seqs=32)
    outs = llm.generate(prompts, GREEDY)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_greedy_matches_with_chunked_prefill(tiny_model, hf_reference, name):
    prompts, expected = hf_reference(name)
    # 16-token budget: every prompt longer than that is prefilled in chunks, mixed with decodes.
    llm = LLM(tiny_model(name), dtype="float32", max_model_len=128, max_num_seqs=8,
              max_num_batched_tokens=16, block_size=4)
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.llm_engine.get_stats().num_steps_total > sum(len(p) for p in prompts) // 16


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_greedy_matches_with_preemption(tiny_model, hf_reference, name):
    prompts, expected = hf_reference(name)
    # 24 usable blocks of 4 tokens = 96 slots for 16 requests of up to 80 tokens: must preempt.
    llm = LLM(tiny_model(name), dtype="float32", max_model_len=128, max_num_seqs=16,
              block_size=4, num_gpu_blocks_override=25)
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions_total > 0
    assert stats.num_used_blocks == 0  # everything freed at the end


def test_prefix_cache_hits_keep_greedy_tokens(tiny_model, hf_reference):
    prompts, expected = hf_reference("llama")
    llm = LLM(tiny_model("llama"), dtype="float32", max_model_len=128, block_size=4)
    first = llm.generate(prompts, GREEDY)
    second = llm.generate(prompts, GREEDY)  # full blocks of every prompt are now cached
    assert [o.outputs[0].token_ids for o in first] == expected
    assert [o.outputs[0].token_ids for o in second] == expected
    assert sum(o.num_cached_tokens for o in second) > 0
    assert llm.llm_engine.get_stats().prefix_cache_hits_total > 0


@pytest.mark.parametrize("name", ARCHS)
def test_logits_match_transformers(tiny_model, name):
    """Our model over the paged cache (two chunks, scattered blocks) vs HF logits at every position."""
    path = tiny_model(name)
    llm = LLM(path, dtype="float32", max_model_len=128, block_size=4, num_gpu_blocks_override=64)
    runner = llm.llm_engine.model_runner
    model, backend = runner.model, runner.backend
    cfg = runner.model_config
    torch.manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ref = hf_model(path)(ids).logits
    bs = 4
    tables = torch.tensor([list(range(40, 50)), [7, 3, 12, 9, 1, 30, 31, 2, 20, 21]], dtype=torch.int32)

    def slots(row: int, pos: torch.Tensor) -> torch.Tensor:
        return tables[row, pos // bs].long() * bs + pos % bs

    def run(input_ids, positions, slot_mapping, qsl, seq_lens, rows):
        meta = AttentionMetadata(
            slot_mapping=slot_mapping, query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables[rows],
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:], strict=False)), max_seq_len=max(seq_lens), block_size=bs)
        backend.prepare(meta)
        with torch.no_grad():
            return model.compute_logits(model(input_ids, positions, meta))

    p0, p1 = torch.arange(25), torch.arange(40)
    chunk1 = run(torch.cat([ids[0, :25], ids[1]]), torch.cat([p0, p1]), torch.cat([slots(0, p0), slots(1, p1)]),
                 [0, 25, 65], [25, 40], [0, 1])
    p0 = torch.arange(25, 40)
    chunk2 = run(ids[0, 25:], p0, slots(0, p0), [0, 15], [40], [0])
    ours = torch.stack([torch.cat([chunk1[:25], chunk2]), chunk1[25:]])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_logprobs_match_transformers(tiny_model):
    path = tiny_model("qwen2")
    prompts = make_prompts(ModelConfig.from_pretrained(path).vocab_size)[:6]
    llm = LLM(path, dtype="float32", max_model_len=128)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, logprobs=5))
    model = hf_model(path)
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
        top = ref.topk(5)
        entry = out.outputs[0].logprobs[0]
        assert set(entry) == set(top.indices.tolist())  # greedy: the sampled token is the top one
        for rank, (tid, value) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True), 1):
            assert entry[tid].logprob == pytest.approx(value, abs=1e-4)
            assert entry[tid].rank == rank
        assert out.outputs[0].cumulative_logprob == pytest.approx(top.values[0].item(), abs=1e-4)
