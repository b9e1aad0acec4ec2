"""spec.engine -> worker CLI flags with vLLM's names."""

from infergrid.operator.engine_args import build_engine_args
from infergrid.operator.spec import EngineSpec, SpeculativeSpec


def test_defaults_give_dtype_seqs_memory_tp_and_prefix_caching():
    assert build_engine_args(EngineSpec()) == [
        "--dtype", "auto", "--max-num-seqs", "256", "--gpu-memory-utilization", "0.9",
        "--tensor-parallel-size", "1", "--enable-prefix-caching",
    ]


def test_every_engine_field_maps_to_its_vllm_flag():
    engine = EngineSpec(dtype="bfloat16", max_model_len=8192, max_num_seqs=64, max_num_batched_tokens=4096,
                        gpu_memory_utilization=0.85, block_size=32, enforce_eager=True, tensor_parallel_size=4,
                        enable_prefix_caching=False,
                        speculative=SpeculativeSpec(method="draft", num_tokens=5))
    args = build_engine_args(engine, draft_model_path="/mnt/draft")
    assert args == [
        "--dtype", "bfloat16", "--max-model-len", "8192", "--max-num-seqs", "64",
        "--max-num-batched-tokens", "4096", "--gpu-memory-utilization", "0.85", "--block-size", "32",
        "--tensor-parallel-size", "4", "--no-enable-prefix-caching", "--enforce-eager",
        "--speculative-method", "draft", "--num-speculative-tokens", "5", "--draft-model", "/mnt/draft",
    ]


def test_draft_lm_head_dtype_maps_to_its_flag():
    spec = SpeculativeSpec(method="draft", num_tokens=4, draft_lm_head_dtype="fp8")
    args = build_engine_args(EngineSpec(speculative=spec), draft_model_path="/mnt/draft")
    assert args[-4:] == ["--draft-model", "/mnt/draft", "--draft-lm-head-dtype", "fp8"]


def test_ngram_speculation_has_no_draft_model():
    args = build_engine_args(EngineSpec(speculative=SpeculativeSpec(method="ngram", num_tokens=3)))
    assert args[-4:] == ["--speculative-method", "ngram", "--num-speculative-tokens", "3"]
    assert "--draft-model" not in args


def test_method_none_means_no_speculation_whatever_num_tokens_says():
    args = build_engine_args(EngineSpec(speculative=SpeculativeSpec(method="none", num_tokens=8)))
    assert not any(arg.startswith(("--speculative", "--num-speculative", "--draft")) for arg in args)


def test_disable_by_batch_size_maps_to_its_flag_only_when_set():
    spec = SpeculativeSpec(method="ngram", num_tokens=4, disable_by_batch_size=8)
    assert build_engine_args(EngineSpec(speculative=spec))[-2:] == ["--speculative-disable-by-batch-size", "8"]
    # Unset: the worker's default, and no flag (existing services keep their spec hash).
    args = build_engine_args(EngineSpec(speculative=SpeculativeSpec(method="ngram", num_tokens=4)))
    assert "--speculative-disable-by-batch-size" not in args
