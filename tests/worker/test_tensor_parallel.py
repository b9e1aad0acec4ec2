"""Tensor parallelism on CPU (gloo): size checks, per-rank shard loading, TP=2/4 greedy parity with
TP=1 through the offline API, and rank lifecycle (a dead rank kills the engine; no orphans)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from infergrid.worker import LLM, EngineConfig, SamplingParams
from infergrid.worker.distributed.executor import RankDiedError
from infergrid.worker.distributed.parallel_state import verify_tensor_parallel_size
from infergrid.worker.layers.attention_backends import get_attention_backend
from infergrid.worker.lazy_weight import LazyWeight
from infergrid.worker.loader import iterate_weights, load_model
from infergrid.worker.model_config import ModelConfig

PROMPTS = ["Hello, how are you", "The quick brown fox jumps over the lazy dog. A small model",
           "What is the capital of France? Paris is", "Once upon a time"]
# Shared 24-token prefixes (prefix-cache hits) and a small token budget (chunked prefill, mixed
# prefill + decode batches) go through the same broadcast path as plain decode steps.
SHARED = "Every morning the baker opened the shop, the children walked to school, and"
PROMPTS += [SHARED + " the old man", SHARED + " then"]
ENGINE_ARGS = dict(dtype="float32", device="cpu", max_model_len=256, max_num_seqs=8, block_size=8,
                   max_num_batched_tokens=32, num_gpu_blocks_override=160)
GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=3)


def is_gone(pid: int) -> bool:
    """The process no longer runs (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(is_gone(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if not is_gone(p)]


# -- size checks ------------------------------------------------------------------------------------
def test_sizes_that_do_not_split_the_heads_are_refused_with_the_numbers():
    for tp in (1, 2, 4):
        verify_tensor_parallel_size(tp, 4, 2, 128)
    verify_tensor_parallel_size(8, 32, 8, 14336)
    with pytest.raises(ValueError) as err:
        verify_tensor_parallel_size(3, 4, 2, 128)
    assert str(err.value).startswith("tensor_parallel_size 3 does not divide the model's num_attention_heads 4")
    assert "valid tensor_parallel_size values for this model: 1, 2, 4" in str(err.value)
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 does not divide num_key_value_heads 3"):
        verify_tensor_parallel_size(2, 6, 3, 128)
    with pytest.raises(ValueError, match=r"tensor_parallel_size 8 does not divide the model's num_attention_heads 4"):
        verify_tensor_parallel_size(8, 4, 2, 128)


def test_engine_config_refuses_a_size_that_does_not_divide_the_heads(tiny_llama):
    with pytest.raises(ValueError, match=r"^tensor_parallel_size 3 does not divide the model's num_attention_heads 4"):
        EngineConfig(model=tiny_llama, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="num_attention_heads 4"):
        LLM(tiny_llama, tensor_parallel_size=8)
    assert EngineConfig(model=tiny_llama, tensor_parallel_size=4).tensor_parallel_size == 4


# -- sharded loading --------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "tp", "rank"), [("qwen2", 2, 1), ("llama_untied", 4, 3), ("qwen3", 4, 0)])
def test_each_rank_loads_exactly_its_shard_and_reads_only_that(tiny_model, monkeypatch, name, tp, rank):
    path = tiny_model(name)
    cfg = ModelConfig.from_pretrained(path)
    full = dict(iterate_weights(path))
    read: list[int] = []
    real_load = LazyWeight.load
    monkeypatch.setattr(LazyWeight, "load", lambda self: read.append(self.numel()) or real_load(self))
    model = load_model(path, cfg, torch.float32, torch.device("cpu"), 64, get_attention_backend(torch.device("cpu")),
                       tp_rank=rank, tp_size=tp)
    params = dict(model.named_parameters())
    hd, heads, kv = cfg.head_dim, cfg.num_attention_heads // tp, 1  # 4 heads, 2 KV heads: 1 KV head per rank
    kv_index = rank * cfg.num_key_value_heads // tp  # KV heads replicated when tp > 2
    inter, vocab = cfg.intermediate_size // tp, -(-cfg.vocab_size // tp)

    def rows(t, i, n):
        return t[i * n:(i + 1) * n]

    a = "model.layers.1.self_attn."
    q, k, v = full[a + "q_proj.weight"], full[a + "k_proj.weight"], full[a + "v_proj.weight"]
    expected_qkv = torch.cat([rows(q, rank, heads * hd), rows(k, kv_index, kv * hd), rows(v, kv_index, kv * hd)])
    assert torch.equal(params[a + "qkv_proj.weight"], expected_qkv)
    if cfg.qkv_bias:
        qb, kb = full[a + "q_proj.bias"], full[a + "k_proj.bias"]
        assert torch.equal(params[a + "qkv_proj.bias"][: heads * hd], rows(qb, rank, heads * hd))
        assert torch.equal(params[a + "qkv_proj.bias"][heads * hd: (heads + 1) * hd], rows(kb, kv_index, hd))
    o = full[a + "o_proj.weight"]
    assert torch.equal(params[a + "o_proj.weight"], o[:, rank * heads * hd:(rank + 1) * heads * hd])
    m = "model.layers.0.mlp."
    gate_up = torch.cat([rows(full[m + "gate_proj.weight"], rank, inter), rows(full[m + "up_proj.weight"], rank, inter)])
    assert torch.equal(params[m + "gate_up_proj.weight"], gate_up)
    assert torch.equal(params[m + "down_proj.weight"], full[m + "down_proj.weight"][:, rank * inter:(rank + 1) * inter])
    assert torch.equal(params["model.embed_tokens.weight"], rows(full["model.embed_tokens.weight"], rank, vocab))
    if "lm_head.weight" in full:
        assert torch.equal(params["lm_head.weight"], rows(full["lm_head.weight"], rank, vocab))
    if cfg.qk_norm:
        assert torch.equal(params[a + "q_norm.weight"], full[a + "q_norm.weight"])
    # Only the shard is read: 1/tp of each sharded tensor, one KV head of k/v, all of each norm.
    expected_read = sum(
        t.numel() if "norm" in n else t.numel() * kv // cfg.num_key_value_heads if ("k_proj" in n or "v_proj" in n)
        else t.numel() // tp for n, t in full.items()
    )
    assert sum(read) == expected_read < sum(t.numel() for t in full.values()) / (tp - 0.5)


# -- greedy parity ----------------------------------------------------------------------------------
_reference: dict[str, list] = {}


def generate(path: str, tp: int) -> tuple[list, list[int]]:
    llm = LLM(path, tensor_parallel_size=tp, **ENGINE_ARGS)
    try:
        outs = llm.generate(PROMPTS, GREEDY)
        pids = llm.llm_engine.model_executor.rank_pids
    finally:
        llm.llm_engine.shutdown()
    return [o.outputs[0] for o in outs], pids


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_greedy_outputs_match_tp1(tiny_model, name, tp):
    path = tiny_model(name)
    if name not in _reference:
        _reference[name] = generate(path, 1)[0]
    expected = _reference[name]
    got, pids = generate(path, tp)
    assert len(pids) == tp and pids[0] == os.getpid()
    for e, g in zip(expected, got, strict=True):
        assert g.token_ids == e.token_ids
        assert g.text == e.text
        for e_lp, g_lp in zip(e.logprobs, g.logprobs, strict=True):  # the gathered logits are the full vocab
            assert list(g_lp) == list(e_lp)
            for tok in e_lp:
                assert g_lp[tok].logprob == pytest.approx(e_lp[tok].logprob, abs=1e-4)
    assert not wait_gone(pids[1:], 5.0), "ranks still running after shutdown"


def test_ngram_speculative_decoding_under_tp2_matches_tp1(tiny_llama):
    if "llama" not in _reference:
        _reference["llama"] = generate(tiny_llama, 1)[0]
    llm = LLM(tiny_llama, tensor_parallel_size=2, speculative_method="ngram", num_speculative_tokens=3, **ENGINE_ARGS)
    try:
        outs = llm.generate(PROMPTS, GREEDY)
        stats = llm.llm_engine.get_stats()
    finally:
        llm.llm_engine.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == [e.token_ids for e in _reference["llama"]]
    assert stats.spec_decode_num_draft_tokens_total > 0  # verification batches went through the broadcast


@pytest.mark.parametrize("draft", ["llama", "llama_draft"])
def test_draft_model_speculative_decoding_under_tp2_matches_tp1(tiny_model, tiny_llama, draft):
    """The draft model runs unsharded on rank 0 and its drafts reach the other ranks in the step header:
    the same greedy tokens as TP=1 without speculation, with the target itself as the draft (every
    draft accepted) and with an unrelated one (nearly every draft rejected, KV slots rolled back)."""
    if "llama" not in _reference:
        _reference["llama"] = generate(tiny_llama, 1)[0]
    llm = LLM(tiny_llama, tensor_parallel_size=2, speculative_method="draft", num_speculative_tokens=3,
              draft_model=tiny_model(draft), **ENGINE_ARGS)
    try:
        outs = llm.generate(PROMPTS, GREEDY)
        stats = llm.llm_engine.get_stats()
        pids = llm.llm_engine.model_executor.rank_pids
    finally:
        llm.llm_engine.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == [e.token_ids for e in _reference["llama"]]
    acceptance = stats.spec_decode_num_accepted_tokens_total / stats.spec_decode_num_draft_tokens_total
    assert stats.spec_decode_num_draft_tokens_total > 0
    assert acceptance >= 0.98 if draft == "llama" else acceptance < 0.2
    assert not wait_gone(pids[1:], 5.0), "ranks still running after shutdown"


# -- lifecycle --------------------------------------------------------------------------------------
def test_a_rank_killed_mid_generation_fails_it_and_the_other_ranks_stop(tiny_llama):
    llm = LLM(tiny_llama, tensor_parallel_size=4, **ENGINE_ARGS)
    engine = llm.llm_engine
    pids = engine.model_executor.rank_pids
    errors: list[BaseException] = []

    def generate() -> None:
        try:
            llm.generate(["Hello"] * 4, SamplingParams(max_tokens=240, ignore_eos=True))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            errors.append(exc)

    thread = threading.Thread(target=generate)
    try:
        thread.start()
        while engine.num_steps_total < 4 and thread.is_alive():
            time.sleep(0.01)
        os.kill(pids[2], signal.SIGKILL)
        thread.join(10.0)
        assert not thread.is_alive(), "generate() hung after a rank died"
        assert len(errors) == 1 and isinstance(errors[0], RankDiedError), errors
        assert f"rank 2 (pid {pids[2]}) exited with code -9" in str(errors[0])
        with pytest.raises(RankDiedError, match="rank 2"):
            engine.check_health()
        with pytest.raises(RankDiedError, match="rank 2"):
            llm.generate("Hello", SamplingParams(max_tokens=2))
        assert not wait_gone(pids[1:], 5.0), "surviving ranks were not stopped"
    finally:
        engine.shutdown()


def test_ranks_exit_when_the_engine_process_is_killed(tiny_llama):
    script = textwrap.dedent(f"""
        import sys, time
        from infergrid.worker import LLM
        if __name__ == "__main__":
            llm = LLM({tiny_llama!r}, tensor_parallel_size=2, dtype="float32", device="cpu", max_model_len=64,
                      num_gpu_blocks_override=16)
            print(*llm.llm_engine.model_executor.rank_pids, flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]  # type: ignore[union-attr]
        assert len(pids) == 2 and pids[0] == proc.pid
        assert not is_gone(pids[1])
        proc.kill()
        proc.wait(10)
        assert not wait_gone(pids[1:], 5.0), "an orphaned rank outlived the engine process"
    finally:
        proc.kill()


def test_a_plain_script_runs_tp2_and_a_second_engine_after_shutdown(tiny_llama, tmp_path):
    """No `if __name__ == "__main__":` guard: the ranks start from their own entry point, not by
    re-importing the script (which would build the engine again in each rank). `with LLM(...)` releases
    the ranks, so a second TP engine starts in the same process; using a shut-down LLM says so."""
    script = tmp_path / "plain.py"
    script.write_text(textwrap.dedent(f"""
        import json, os
        from infergrid.worker import LLM, SamplingParams
        print("script body ran in", os.getpid(), flush=True)
        args = dict(tensor_parallel_size=2, dtype="float32", device="cpu", max_model_len=64,
                    num_gpu_blocks_override=16)
        greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        with LLM({tiny_llama!r}, **args) as llm:
            first = llm.generate("Hello", greedy)[0].outputs[0].token_ids
            ranks = llm.llm_engine.model_executor.rank_pids
        llm2 = LLM({tiny_llama!r}, **args)
        second = llm2.generate("Hello", greedy)[0].outputs[0].token_ids
        llm2.shutdown()
        llm2.shutdown()  # idempotent
        try:
            llm2.generate("Hello", greedy)
            after = "generated"
        except RuntimeError as exc:
            after = str(exc)
        print(json.dumps({{"first": list(first), "second": list(second), "ranks": ranks, "after": after}}))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert len([line for line in lines if line.startswith("script body ran")]) == 1, out.stdout
    result = json.loads(lines[-1])
    assert result["first"] == result["second"] and len(result["first"]) == 4  # same greedy tokens
    assert result["after"].startswith("this LLM was shut down")
    assert not wait_gone(result["ranks"][1:], 5.0), "a rank outlived its engine's shutdown"
