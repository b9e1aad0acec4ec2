"""Triton paged attention for CUDA: one kernel for prefill, chunked prefill and decode.

Grid: (query tiles, sequences, kv heads). A program takes BLOCK_M query tokens of one sequence and
all GROUP query heads that share one kv head (GQA), i.e. a [BLOCK_M * GROUP, head_dim] tile of q,
and streams that sequence's context out of the paged cache in chunks of BLOCK_N keys with an online
softmax (flash-attention style). Keys after a query's own position are masked (causal), so the loop
stops at the tile's last position. Reads only the metadata tensors, so it is CUDA-graph safe; a
sequence with 0 query tokens does nothing.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from infergrid.worker.layers.attention import AttentionMetadata
from infergrid.worker.layers.torch_attention import TorchAttentionBackend

MAX_SPLIT_QUERY_LEN = 8  # queries up to this long (decode, verification of up to 7 drafts) split the context


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    part_acc_ptr, part_ml_ptr,
    scale,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    NUM_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    # axis 0: query tile, or (NUM_SPLITS > 1: every query in one tile) the split of the context
    if NUM_SPLITS == 1:
        tile = tl.program_id(0)
        split = 0
    else:
        tile = 0
        split = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_Q)
    tok = tile * BLOCK_M + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_M * GROUP) & (tok < q_len)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = d < HEAD_DIM
    q_offs = (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    q_pos = ctx_len + tok
    kv_end = tl.minimum(seq_len, ctx_len + (tile + 1) * BLOCK_M)

    kv_start = 0
    if NUM_SPLITS > 1:
        chunk = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
        kv_start = split * chunk
        kv_end = tl.minimum(kv_end, kv_start + chunk)

    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, HEAD_DIM_PAD], tl.float32)
    for start in range(kv_start, kv_end, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        k_valid = kpos < kv_end
        page = tl.load(block_tables_ptr + seq * stride_bt + kpos // PAGE_SIZE, mask=k_valid, other=0)
        k_offs = page.to(tl.int64) * stride_kb + (kpos % PAGE_SIZE) * stride_ks + kv_head * stride_kh
        v_offs = page.to(tl.int64) * stride_vb + (kpos % PAGE_SIZE) * stride_vs + kv_head * stride_vh
        k = tl.load(k_cache_ptr + k_offs[None, :] + d[:, None], mask=k_valid[None, :] & d_valid[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * scale
        visible = k_valid[None, :] & (kpos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that sees no key of this chunk yet (a split after its position): exp(-inf - -inf) would
        # be NaN, so such a row keeps l = 0 and acc = 0 (and m = -inf: the combine gives it weight 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + v_offs[:, None] + d[None, :], mask=k_valid[:, None] & d_valid[None, :], other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        o_offs = (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])
    else:
        # partial results of this split, combined by _combine_splits_kernel: acc [T, H, S, D], (m, l) [T, H, S, 2]
        part = ((q_start + tok).to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :], acc, mask=row_valid[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_valid)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_valid)


@triton.jit
def _combine_splits_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM_PAD)
    base = (t * NUM_HEADS + h) * NUM_SPLITS + sp
    m = tl.load(part_ml_ptr + base * 2)
    l_part = tl.load(part_ml_ptr + base * 2 + 1)
    m_max = tl.max(m, 0)
    w = tl.exp(m - m_max)  # empty splits have m = -inf: weight 0
    total = tl.sum(l_part * w, 0)
    acc = tl.load(part_acc_ptr + base[:, None] * HEAD_DIM_PAD + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / total
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
) -> torch.Tensor:
    """q [T, Hq, D]; caches [num_blocks, page, Hkv, D] -> out [T, Hq, D] (see the module docstring)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    # Decode and short queries (speculative verification: 1 + k tokens) take one query tile, whose
    # context is split over several programs when the batch alone leaves the GPU idle (flash-decoding);
    # longer queries (prefill) tile the queries instead.
    short = max_query_len <= MAX_SPLIT_QUERY_LEN
    block_m = triton.next_power_of_2(max_query_len) if short else max(1, 64 // group)
    block_q = max(16, triton.next_power_of_2(block_m * group))
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    block_n = 64 if head_dim_pad <= 128 else 32
    num_splits = num_decode_splits(num_seqs, num_kv_heads, q.device) if short else 1
    if num_splits > 1:
        part_acc = torch.empty((num_tokens, num_heads, num_splits, head_dim_pad), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((num_tokens, num_heads, num_splits, 2), dtype=torch.float32, device=q.device)
        grid = (num_splits, num_seqs, num_kv_heads)
    else:
        part_acc = part_ml = out  # unused
        grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_kv_heads)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out,
        block_tables, seq_lens, query_start_loc,
        part_acc, part_ml,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        NUM_HEADS=num_heads, NUM_SPLITS=num_splits, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, PAGE_SIZE=page_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_tokens, num_heads)](
            part_acc, part_ml, out, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, NUM_SPLITS=num_splits, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        )
    return out


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_decode_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Split each decode sequence's context over several programs (flash-decoding) when the batch
    alone has too few (sequence, kv head) pairs to fill the GPU. Depends on the batch shape only,
    so a CUDA graph captured for a batch size keeps using the same grid."""
    num_sms = _num_sms(device)
    work = num_seqs * num_kv_heads
    if work >= num_sms:
        return 1
    return min(16, triton.next_power_of_2(triton.cdiv(2 * num_sms, work)))


class TritonAttentionBackend:
    """Paged attention with the Triton kernel; the cache-less profiling pass uses the torch path."""

    name = "triton"

    def __init__(self) -> None:
        self._fallback = TorchAttentionBackend()

    def prepare(self, meta: AttentionMetadata) -> None:
        if not meta.has_kv_cache:
            self._fallback.prepare(meta)

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
        if not meta.has_kv_cache:
            return self._fallback.forward(q, k, v, k_cache, v_cache, meta, scale)
        return paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_query_len, scale
        )
