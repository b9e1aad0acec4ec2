"""Paged attention: the per-step metadata, the KV-cache write and a pluggable backend.

KV cache layout, per layer (k and v alike):

    cache[num_blocks, block_size, num_kv_heads, head_dim]
    slot = block_id * block_size + offset        # flat index into cache.view(-1, H_kv, D)

A step's tokens are flattened over the batch ("varlen"): sequence b owns tokens
`query_start_loc[b] : query_start_loc[b+1]`, which are the *last* query_len tokens of its
`seq_lens[b]` context tokens. Its context lives in blocks `block_tables[b, :ceil(seq_len / block_size)]`:

    block_tables[b] = [ 7 | 2 | 9 | 0 (pad) ]     block_size = 4, seq_len = 10
    tokens 0..3 -> block 7, 4..7 -> block 2, 8..9 -> block 9 (offsets 0, 1)

Each step first writes its new k/v through `slot_mapping`, then attends over the whole context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class AttentionMetadata:
    """Inputs shared by every attention layer of one forward pass (all tensors on the model's device).

    `has_kv_cache=False` is the profiling pass: no cache is allocated, every sequence is a fresh
    prefill attending over its own tokens only.
    """

    slot_mapping: torch.Tensor  # [T] int64
    # int32 (int64 where a CUDA graph's staging casts them: runner/graph_inputs.py)
    query_start_loc: torch.Tensor  # [B + 1]
    seq_lens: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, max_blocks]
    max_query_len: int
    max_seq_len: int
    block_size: int
    has_kv_cache: bool = True
    backend_data: Any = None  # built once per step by the backend (see AttentionBackend.prepare)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])


class AttentionBackend(Protocol):
    """How attention over a paged KV cache is computed on some device."""

    name: str

    def prepare(self, meta: AttentionMetadata) -> None:
        """Build whatever the backend needs once per step and store it in `meta.backend_data`."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q [T, Hq, D], this step's k/v [T, Hkv, D] (already in the cache) -> out [T, Hq, D]."""
        ...


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter this step's k/v [T, Hkv, D] into the paged caches at `slot_mapping`."""
    if k.is_cuda:
        from infergrid.worker.layers.triton_ops import write_kv_cache as fused_write

        return fused_write(k, v, k_cache, v_cache, slot_mapping)
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


class Attention(nn.Module):
    """Multi-head (grouped-query) attention over a paged KV cache; owns no weights.

    The model runner binds `k_cache`/`v_cache` after allocating the pool (nano-vllm style).
    """

    def __init__(
        self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int, backend: AttentionBackend
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.backend = backend
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if meta.has_kv_cache:
            write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
