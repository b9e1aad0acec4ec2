"""spec.engine -> `infergrid-worker serve` arguments, with vLLM's CLI names."""

from __future__ import annotations

from infergrid.operator.spec import EngineSpec


def build_engine_args(engine: EngineSpec, draft_model_path: str | None = None) -> list[str]:
    """Engine flags in a fixed order (the order feeds the spec hash, so it must be stable)."""
    args = ["--dtype", engine.dtype]
    optional = (
        ("--max-model-len", engine.max_model_len),
        ("--max-num-seqs", engine.max_num_seqs),
        ("--max-num-batched-tokens", engine.max_num_batched_tokens),
        ("--gpu-memory-utilization", engine.gpu_memory_utilization),
        ("--block-size", engine.block_size),
        ("--tensor-parallel-size", engine.tensor_parallel_size),
    )
    for flag, value in optional:
        if value is not None:
            args += [flag, _format(value)]
    args.append("--enable-prefix-caching" if engine.enable_prefix_caching else "--no-enable-prefix-caching")
    if engine.enforce_eager:
        args.append("--enforce-eager")
    spec = engine.speculative
    if spec.method != "none":
        # NOTE: always explicit: a worker given a method without a token count would propose none and exit.
        args += ["--speculative-method", spec.method, "--num-speculative-tokens", str(spec.num_tokens)]
        if spec.method == "draft" and draft_model_path:
            args += ["--draft-model", draft_model_path]
        if spec.method == "draft" and spec.draft_lm_head_dtype:
            args += ["--draft-lm-head-dtype", spec.draft_lm_head_dtype]
        if spec.disable_by_batch_size is not None:  # (else the worker's default: no flag, no new spec hash)
            args += ["--speculative-disable-by-batch-size", str(spec.disable_by_batch_size)]
    return args


def _format(value: int | float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))
