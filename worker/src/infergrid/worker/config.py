"""Engine configuration: one frozen dataclass with vLLM's argument names.

Built once (from `LLM(**kwargs)`, the CLI or the operator's YAML) and validated in `__post_init__`;
values that depend on the model or the GPU (max model length, number of KV blocks, the token budget)
are computed by methods and returned, never written back.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("auto", "float32", "float", "float16", "half", "bfloat16")
SPECULATIVE_METHODS = ("ngram", "draft")
# Above this many requests sampling in a step, no drafts are proposed (spec_decode/guard.py). Measured with
# k = 4: batch 32 at acceptance ~0.6 still paid a little with a fixed k (1.03x of off on an H200, 1.25x on a
# CPU), while large batches lose the step's pipelining for drafts that no longer come almost free.
DEFAULT_SPECULATIVE_DISABLE_BY_BATCH_SIZE = 32

# vLLM's default budget for the offline LLM class; chunked prefill splits longer prompts.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_int(name: str, value: object, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_int(value) or value < minimum:  # type: ignore[operator]
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """All engine arguments (names as in vLLM's `EngineArgs`).

    `max_model_len=None` means "take it from the model's config"; `max_num_batched_tokens=None` means
    "derive it" (see `get_max_num_batched_tokens`); `device=None` means cuda when available, else cpu;
    `num_gpu_blocks_override` forces the KV pool size (tests use tiny pools). Block 0 of the pool is
    reserved as the null/padding block, so a pool needs at least 2 blocks.
    """

    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    async_scheduling: bool = True
    tensor_parallel_size: int = 1
    speculative_method: str | None = None
    num_speculative_tokens: int = 0
    draft_model: str | None = None
    draft_lm_head_dtype: str | None = None  # "fp8": the draft's LM head in FP8 (layers/fp8_lm_head.py)
    # No drafts in a step whose requests that sample number more than this (>= 1; >= max_num_seqs: never).
    speculative_disable_by_batch_size: int = DEFAULT_SPECULATIVE_DISABLE_BY_BATCH_SIZE
    device: str | None = None
    seed: int = 0
    num_gpu_blocks_override: int | None = None
    model_cache_dir: str | None = None  # where .gguf sources are converted (default: models.default_cache_dir())

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty path or name, got {self.model!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _require_int("max_model_len", self.max_model_len, 1, optional=True)
        _require_int("block_size", self.block_size, 1)
        gmu = self.gpu_memory_utilization
        if isinstance(gmu, bool) or not isinstance(gmu, int | float) or not 0.0 < gmu <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gmu!r}")
        _require_int("max_num_seqs", self.max_num_seqs, 1)
        _require_int("max_num_batched_tokens", self.max_num_batched_tokens, 1, optional=True)
        for flag in ("enforce_eager", "enable_prefix_caching", "async_scheduling"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        _require_int("tensor_parallel_size", self.tensor_parallel_size, 1)
        if self.tensor_parallel_size > 1:  # a local checkpoint is checked now, a remote one after download
            from infergrid.worker.distributed.parallel_state import verify_tensor_parallel_for_model_dir

            verify_tensor_parallel_for_model_dir(self.tensor_parallel_size, self.model)
        self._validate_speculative()
        if self.device is not None and (not isinstance(self.device, str) or not self.device):
            raise ValueError(f"device must be None or a device string like 'cuda:0', got {self.device!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        _require_int("num_gpu_blocks_override", self.num_gpu_blocks_override, 2, optional=True)

    def _validate_speculative(self) -> None:
        method = self.speculative_method
        if method is not None and method not in SPECULATIVE_METHODS:
            raise ValueError(
                f"speculative_method must be None or one of {', '.join(SPECULATIVE_METHODS)}, got {method!r}"
            )
        _require_int("num_speculative_tokens", self.num_speculative_tokens, 0)
        _require_int("speculative_disable_by_batch_size", self.speculative_disable_by_batch_size, 1)
        if method is None and self.num_speculative_tokens:
            raise ValueError("num_speculative_tokens must be 0 when speculative_method is None")
        if method is None and self.speculative_disable_by_batch_size != DEFAULT_SPECULATIVE_DISABLE_BY_BATCH_SIZE:
            raise ValueError("speculative_disable_by_batch_size is only used when speculative_method is set")
        if method is not None and self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1 when speculative_method is {method!r}")
        if method == "draft" and not self.draft_model:
            raise ValueError("draft_model must be set when speculative_method is 'draft'")
        if method != "draft" and self.draft_model is not None:
            raise ValueError("draft_model is only used when speculative_method is 'draft'")
        if self.draft_lm_head_dtype not in (None, "fp8"):
            raise ValueError(f"draft_lm_head_dtype must be None or 'fp8', got {self.draft_lm_head_dtype!r}")
        if method != "draft" and self.draft_lm_head_dtype is not None:
            raise ValueError("draft_lm_head_dtype is only used when speculative_method is 'draft'")

    def get_max_num_batched_tokens(self) -> int:
        """The per-step token budget: the explicit value, else a default large enough for a full
        decode batch (every sequence plus its speculative tokens)."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return max(DEFAULT_MAX_NUM_BATCHED_TOKENS, self.max_num_seqs * (1 + self.num_speculative_tokens))
