"""KV pool sizing: how many blocks fit, from a fixed budget (CPU) or from profiled GPU memory.

On CUDA (the seed's GPUMemoryManager): after the weights are loaded, one profiling forward pass at
the largest batch the scheduler can form measures the peak activation memory; the KV pool gets

    total_gpu_memory * gpu_memory_utilization - (memory in use after loading + peak activations)

On CPU the pool is CPU_KV_CACHE_BYTES (1 GiB). Either way it is capped at what
max_num_seqs full-length sequences could ever use, and `num_gpu_blocks_override` (or the block count a
draft model's runner is given: its target's) wins outright. Blocks include the reserved null block 0.
`profile_forward` is the profiling pass: the model at the largest batch, no KV cache, plus sampling.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from infergrid.worker.layers.attention import AttentionMetadata
from infergrid.worker.model_config import ModelConfig
from infergrid.worker.sample.sampler import Sampler, SamplingMetadata

logger = logging.getLogger(__name__)

_GIB = float(1 << 30)
CPU_KV_CACHE_BYTES = 1 << 30  # the KV pool on CPU (tests, the demo); --num-gpu-blocks-override sets any other size


def kv_block_bytes(model_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, k and v."""
    per_token = 2 * model_config.num_hidden_layers * model_config.num_key_value_heads * model_config.head_dim
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class MemoryProfile:
    """What the profiling pass saw on the GPU (bytes)."""

    total: int
    weights_and_runtime: int  # in use after loading the model, before profiling
    peak_activations: int
    available_for_kv: int


class GPUMemoryManager:
    """Measures GPU memory around a profiling forward pass and derives the KV-cache budget."""

    def __init__(self, device: torch.device, gpu_memory_utilization: float) -> None:
        self.device = device
        self.gpu_memory_utilization = gpu_memory_utilization

    def profile(self, run: Callable[[], None]) -> MemoryProfile:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(self.device)
        free_before, total = torch.cuda.mem_get_info(self.device)
        in_use = total - free_before
        torch.cuda.reset_peak_memory_stats(self.device)
        allocated_before = torch.cuda.memory_allocated(self.device)
        run()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - allocated_before
        gc.collect()
        torch.cuda.empty_cache()
        budget = int(total * self.gpu_memory_utilization) - in_use - peak
        return MemoryProfile(total, in_use, peak, max(0, budget))


def max_useful_blocks(max_num_seqs: int, max_model_len: int, block_size: int) -> int:
    """Blocks that max_num_seqs sequences of max_model_len tokens could hold, plus the null block."""
    return max_num_seqs * -(-max_model_len // block_size) + 1


def determine_num_blocks(
    *,
    device: torch.device,
    model_config: ModelConfig,
    dtype: torch.dtype,
    block_size: int,
    max_num_seqs: int,
    max_model_len: int,
    gpu_memory_utilization: float,
    num_blocks_override: int | None,
    profile_run: Callable[[], None] | None,
    extra_block_bytes: int = 0,
) -> int:
    """The number of KV blocks (null block included) for this device and model; logs the result.

    `extra_block_bytes`: memory that each block id costs elsewhere (a speculative draft model's
    KV pool mirrors the target's block ids), so both pools fit the budget."""
    block_bytes = kv_block_bytes(model_config, block_size, dtype) + extra_block_bytes
    if num_blocks_override is not None:
        num_blocks, source = num_blocks_override, "num_gpu_blocks_override"
    elif device.type == "cuda":
        assert profile_run is not None
        prof = GPUMemoryManager(device, gpu_memory_utilization).profile(profile_run)
        logger.info(
            "GPU memory: total %.2f GiB, in use after load %.2f GiB, peak activations %.2f GiB, "
            "KV budget %.2f GiB (gpu_memory_utilization %.2f)",
            prof.total / _GIB, prof.weights_and_runtime / _GIB, prof.peak_activations / _GIB,
            prof.available_for_kv / _GIB, gpu_memory_utilization,
        )
        num_blocks = prof.available_for_kv // block_bytes
        source = "profiled GPU memory"
        cap = max_useful_blocks(max_num_seqs, max_model_len, block_size)
        if num_blocks > cap:  # NOTE: not a shortage; the budget above holds more than can ever be used
            num_blocks = cap
            source += (f", capped at what max_num_seqs {max_num_seqs} sequences of max_model_len {max_model_len} "
                       f"can use: {max_num_seqs} x {-(-max_model_len // block_size)} blocks + the null block")
    else:
        num_blocks = min(CPU_KV_CACHE_BYTES // block_bytes, max_useful_blocks(max_num_seqs, max_model_len, block_size))
        source = f"{CPU_KV_CACHE_BYTES / _GIB:g} GiB on CPU"
    if num_blocks < 2:
        raise ValueError(
            f"not enough memory for the KV cache: {num_blocks} blocks of {block_bytes} bytes "
            f"(raise gpu_memory_utilization or lower max_model_len / max_num_seqs)"
        )
    logger.info(
        "KV cache: %d blocks x %d tokens = %d token slots, %.3f GiB (%d bytes per block; from %s)",
        num_blocks, block_size, (num_blocks - 1) * block_size, num_blocks * block_bytes / _GIB,
        block_bytes, source,
    )
    return num_blocks


def profile_forward(model: nn.Module, backend: Any, sampler: Sampler, device: torch.device, budget: int,
                    max_model_len: int, max_num_seqs: int, block_size: int) -> None:
    """A forward pass over `budget` tokens in sequences of up to max_model_len (no KV cache yet), then
    the sampler over max_num_seqs rows: the peak activation memory of any step."""
    seq_len = min(max_model_len, budget)
    lens = [seq_len] * (budget // seq_len) + ([budget % seq_len] if budget % seq_len else [])
    qsl = torch.tensor(np.cumsum([0, *lens]), dtype=torch.int32, device=device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(budget, dtype=torch.int64, device=device),
        query_start_loc=qsl,
        seq_lens=seq_lens,
        block_tables=torch.zeros((len(lens), 0), dtype=torch.int32, device=device),
        max_query_len=seq_len,
        max_seq_len=seq_len,
        block_size=block_size,
        has_kv_cache=False,
    )
    backend.prepare(meta)
    input_ids = torch.zeros(budget, dtype=torch.int64, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    hidden = model(input_ids, positions, meta)
    num_rows = min(max_num_seqs, budget)
    logits = model.compute_logits(hidden[:num_rows])
    if logits is not None:  # None on tensor-parallel ranks other than 0 (they never sample)
        temperature = torch.ones(num_rows, device=device)
        sampler(logits, SamplingMetadata(temperature=temperature, all_greedy=False, max_num_logprobs=20))
