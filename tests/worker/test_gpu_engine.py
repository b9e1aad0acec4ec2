"""CUDA path: Triton paged attention vs the torch reference, CUDA-graph decode parity with
transformers, seeded sampling, memory profiling and a decode-throughput smoke run.
Run on a GPU machine: `pytest -m gpu tests/worker/test_gpu_engine.py -s`."""

from __future__ import annotations

import random
import time

import pytest
import torch

from infergrid.worker import LLM, SamplingParams
from infergrid.worker.layers.attention import AttentionMetadata
from infergrid.worker.layers.torch_attention import TorchAttentionBackend

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device"


def _paged_case(group: int, head_dim: int, dtype: torch.dtype, specs: list[tuple[int, int]], page: int = 16):
    """Random paged caches and queries for sequences given as (seq_len, query_len)."""
    from infergrid.worker.layers.triton_attention import paged_attention

    dev = "cuda"
    num_kv_heads, num_blocks = 2, 128
    k_cache = torch.randn(num_blocks, page, num_kv_heads, head_dim, dtype=dtype, device=dev)
    v_cache = torch.randn_like(k_cache)
    perm = (torch.randperm(num_blocks - 1) + 1).tolist()
    width = max(-(-s // page) for s, _ in specs)
    tables = torch.zeros(len(specs), width, dtype=torch.int32)
    for i, (seq_len, _) in enumerate(specs):
        n = -(-seq_len // page)
        tables[i, :n] = torch.tensor(perm[:n])
        perm = perm[n:]
    qsl = [0]
    for _, q_len in specs:
        qsl.append(qsl[-1] + q_len)
    q = torch.randn(qsl[-1], num_kv_heads * group, head_dim, dtype=dtype, device=dev)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(qsl[-1], dtype=torch.int64, device=dev),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([s for s, _ in specs], dtype=torch.int32, device=dev),
        block_tables=tables.to(dev), max_query_len=max(q for _, q in specs),
        max_seq_len=max(s for s, _ in specs), block_size=page)
    ref_backend = TorchAttentionBackend()
    ref_backend.prepare(meta)
    scale = head_dim**-0.5
    ref = ref_backend.forward(q.float(), None, None, k_cache.float(), v_cache.float(), meta, scale)
    out = paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                          meta.max_query_len, scale)
    return out.float(), ref


MIXED = [(37, 1), (200, 200), (300, 45), (1, 1), (1000, 1), (70, 70)]
DECODE = [(37, 1), (5, 1), (1500, 1), (1, 1), (64, 1)]


@pytest.mark.parametrize("specs", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_torch_reference(specs, group, head_dim, dtype):
    torch.manual_seed(0)
    out, ref = _paged_case(group, head_dim, dtype, specs)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ops_match_torch(dtype):
    from infergrid.worker.layers import triton_ops
    from infergrid.worker.layers.layernorm import RMSNorm
    from infergrid.worker.layers.rotary import RotaryEmbedding

    torch.manual_seed(0)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    x, res = torch.randn(2, 37, 2048, dtype=dtype).unbind(0)
    norm = RMSNorm(2048, 1e-5).to(dtype)
    norm.weight.data.normal_()
    ref_out, ref_sum = norm(x, res)  # CPU torch path
    out, summed = triton_ops.rms_norm(x.cuda(), norm.weight.cuda(), 1e-5, res.cuda())
    torch.testing.assert_close(summed.cpu(), ref_sum, **tol)
    torch.testing.assert_close(out.cpu(), ref_out, **tol)
    torch.testing.assert_close(triton_ops.rms_norm(x.cuda(), norm.weight.cuda(), 1e-5).cpu(), norm(x), **tol)

    rope = RotaryEmbedding(128, 4096, 500000.0, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    qkv = torch.randn(37, (32 + 2 * 8) * 128, dtype=dtype)
    positions = torch.randint(0, 4096, (37,))
    q, k = qkv[:, : 32 * 128].view(37, 32, 128), qkv[:, 32 * 128 : 40 * 128].view(37, 8, 128)
    ref_q, ref_k = rope(positions, q, k)
    qkv_gpu = qkv.cuda()
    gq, gk = qkv_gpu[:, : 32 * 128].view(37, 32, 128), qkv_gpu[:, 32 * 128 : 40 * 128].view(37, 8, 128)
    rope.cuda()(positions.cuda(), gq, gk)  # in place
    torch.testing.assert_close(gq.cpu(), ref_q, **tol)
    torch.testing.assert_close(gk.cpu(), ref_k, **tol)
    torch.testing.assert_close(qkv_gpu[:, 40 * 128 :].cpu(), qkv[:, 40 * 128 :])  # v untouched

    k_cache = torch.zeros(16, 16, 8, 128, dtype=dtype, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(256)[:37].cuda()
    v = qkv_gpu[:, 40 * 128 :].view(37, 8, 128)
    triton_ops.write_kv_cache(gk, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, 8, 128)[slots], gk) and torch.equal(v_cache.view(-1, 8, 128)[slots], v)

    gate_up = torch.randn(37, 2 * 8192, dtype=dtype)
    ref = torch.nn.functional.silu(gate_up[:, :8192]) * gate_up[:, 8192:]
    torch.testing.assert_close(triton_ops.silu_and_mul(gate_up.cuda()).cpu(), ref, **tol)


def _prompts(vocab_size: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[0] + [rng.randrange(3, vocab_size) for _ in range(n)] for n in
            [0, 1, 2, 4, 7, 12, 15, 16, 20, 30, 31, 32, 39, 46, 63, 69]]


def _hf_greedy(path: str, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY.max_tokens,
                                 do_sample=False, pad_token_id=2)
            out.append(gen[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_cuda_graph_greedy_matches_transformers(tiny_model, name):
    path = tiny_model(name)
    llm = LLM(path, dtype="float32", max_model_len=128, max_num_seqs=32, device="cuda")
    runner = llm.llm_engine.model_runner
    assert runner.backend.name == "triton" and runner.decode_graphs is not None
    prompts = _prompts(llm.llm_engine.model_config.vocab_size)
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == _hf_greedy(path, prompts)
    assert runner.decode_graphs.num_replays > 0


def test_cuda_chunked_prefill_and_preemption(tiny_model):
    path = tiny_model("llama")
    prompts = _prompts(384)
    expected = _hf_greedy(path, prompts)
    for kwargs in (dict(max_num_batched_tokens=16), dict(block_size=4, num_gpu_blocks_override=25),
                   dict(enforce_eager=True)):
        args = dict(dtype="float32", max_model_len=128, max_num_seqs=16, device="cuda") | kwargs
        llm = LLM(path, **args)
        outs = llm.generate(prompts, GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == expected, kwargs
        if "num_gpu_blocks_override" in kwargs:
            assert llm.llm_engine.get_stats().num_preemptions_total > 0


def test_cuda_seeded_sampling_is_reproducible(tiny_llama):
    llm = LLM(tiny_llama, dtype="bfloat16", max_model_len=256, device="cuda")
    seeded = SamplingParams(temperature=0.9, top_k=50, max_tokens=24, seed=11)
    alone = llm.generate(["The quick brown fox"], seeded)[0].outputs[0].token_ids
    batch = llm.generate(["Hello", "The quick brown fox", "Once upon"],
                         [SamplingParams(temperature=1.0, max_tokens=30), seeded, GREEDY])
    assert batch[1].outputs[0].token_ids == alone


def test_memory_profile_sizes_the_pool(tiny_llama):
    from infergrid.worker.runner.kv_cache import GPUMemoryManager

    llm = LLM(tiny_llama, dtype="bfloat16", max_model_len=1024, device="cuda", gpu_memory_utilization=0.5)
    runner = llm.llm_engine.model_runner
    prof = GPUMemoryManager(runner.device, 0.5).profile(runner.profile_run)
    assert prof.peak_activations > 0
    assert prof.available_for_kv <= prof.total * 0.5
    assert llm.llm_engine.num_blocks >= 2


def test_decode_throughput_smoke(tmp_path):
    """A Llama-3.2-1B-shaped random model in bf16: prints batch-1 and batch-64 decode tokens/s."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from infergrid.worker.tiny_model import _write_tokenizer, train_tokenizer

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                      tie_word_embeddings=True, rope_theta=500000.0, bos_token_id=0, eos_token_id=1)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    del model
    _write_tokenizer(str(tmp_path), train_tokenizer())
    llm = LLM(str(tmp_path), dtype="bfloat16", max_model_len=2048, max_num_seqs=64, device="cuda")
    params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
    for batch in (1, 64):
        prompts = [[0] + [10 + i] * 127 for i in range(batch)]
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))  # JIT warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        num_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(f"\n[decode smoke] batch {batch}: {num_tokens / elapsed:.0f} tok/s "
              f"({elapsed:.2f} s for {num_tokens} tokens, prompt 128, {torch.cuda.get_device_name()})")
        assert num_tokens == 256 * batch
