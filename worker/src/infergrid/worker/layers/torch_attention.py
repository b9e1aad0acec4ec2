"""Reference attention backend: gather each sequence's context from the paged cache, pad the
batch, run one masked `scaled_dot_product_attention`. Exact (float32 on CPU), works on any device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from infergrid.worker.layers.attention import AttentionMetadata


@dataclass
class _Gather:
    q_index: torch.Tensor  # [B, max_q] flat token index per padded query row
    q_valid: torch.Tensor  # [B, max_q] bool
    kv_index: torch.Tensor  # [B, max_seq] flat cache slot (or token index without a cache)
    mask: torch.Tensor  # [B, 1, max_q, max_seq] bool, True = attend


class TorchAttentionBackend:
    """Gather + padded SDPA. Causal within each sequence; the context before the step's first
    query token is fully visible."""

    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> None:
        qsl, seq_lens = meta.query_start_loc.long(), meta.seq_lens.long()
        device = seq_lens.device
        q_lens = qsl[1:] - qsl[:-1]
        ctx_start = seq_lens - q_lens
        rows = torch.arange(meta.max_query_len, device=device)
        cols = torch.arange(meta.max_seq_len, device=device)
        q_valid = rows[None, :] < q_lens[:, None]
        q_index = torch.where(q_valid, qsl[:-1, None] + rows[None, :], 0)
        kv_valid = cols[None, :] < seq_lens[:, None]
        if meta.has_kv_cache:
            bs = meta.block_size
            block_idx = (cols // bs).clamp(max=meta.block_tables.shape[1] - 1)
            blocks = meta.block_tables.long()[:, block_idx]
            kv_index = blocks * bs + (cols % bs)[None, :]
        else:
            kv_index = qsl[:-1, None] + cols[None, :]
        kv_index = torch.where(kv_valid, kv_index, 0)
        causal = cols[None, None, :] <= (ctx_start[:, None, None] + rows[None, :, None])
        mask = causal & kv_valid[:, None, :]
        # Padded query rows attend to key 0 only, so the softmax never sees an all-masked row.
        mask[:, :, 0] |= ~q_valid
        meta.backend_data = _Gather(q_index, q_valid, kv_index, mask.unsqueeze(1))

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
        g: _Gather = meta.backend_data
        if meta.has_kv_cache:
            num_kv_heads, head_dim = k_cache.shape[-2:]
            k_src = k_cache.view(-1, num_kv_heads, head_dim)
            v_src = v_cache.view(-1, num_kv_heads, head_dim)
        else:
            k_src, v_src = k, v
        qp = q[g.q_index].transpose(1, 2)  # [B, Hq, max_q, D]
        kp = k_src[g.kv_index].transpose(1, 2)  # [B, Hkv, max_seq, D]
        vp = v_src[g.kv_index].transpose(1, 2)
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=g.mask, scale=scale, enable_gqa=True)
        out = out.transpose(1, 2)[g.q_valid]  # the sequences' tokens: a prefix of the T tokens
        if out.shape[0] < q.shape[0]:  # padding tokens past the last sequence (CUDA-graph layouts): zeros
            out = torch.cat([out, out.new_zeros(q.shape[0] - out.shape[0], *out.shape[1:])])
        return out  # [T, Hq, D]
