"""Fused CUDA kernels for the elementwise parts of a decoder layer (Triton).

Decode is bound by memory and by kernel count: unfused, one layer is ~40 small kernels. These
fuse them to one kernel each: residual add + RMSNorm, RoPE on q and k (in place), the KV-cache
write of k and v, and silu(gate) * up. Each follows the reference's rounding (the sum is rounded to
the model dtype before the norm, the normalised value before the weight), so bf16 results match
the plain torch ops closely; float32 results match to rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, y, mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of x [..., N]; with `residual`, norm(x + residual) and the sum."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res2 = residual.reshape(-1, shape[-1]) if residual is not None else x2
    res_out = torch.empty_like(out) if residual is not None else out
    block = triton.next_power_of_2(shape[-1])
    _rms_norm_kernel[(x2.shape[0],)](
        x2, res2, weight, out, res_out, shape[-1], eps,
        x2.stride(0), res2.stride(0), out.stride(0), res_out.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 8),
    )
    if residual is None:
        return out.view(shape)
    return out.view(shape), res_out.view(shape)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
    HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF_PAD)
    d_mask = d < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + d, mask=d_mask, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cos + d, mask=d_mask, other=0.0)
    h = tl.arange(0, HEADS_PAD)
    # q heads
    m = (h[:, None] < NUM_Q_HEADS) & d_mask[None, :]
    base = q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :]
    x1 = tl.load(base, mask=m, other=0.0)
    x2 = tl.load(base + HALF, mask=m, other=0.0)
    c = cos[None, :].to(x1.dtype)
    s = sin[None, :].to(x1.dtype)
    tl.store(base, (x1 * c - x2 * s).to(x1.dtype), mask=m)
    tl.store(base + HALF, (x2 * c + x1 * s).to(x1.dtype), mask=m)
    # k heads
    m = (h[:, None] < NUM_K_HEADS) & d_mask[None, :]
    base = k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :]
    x1 = tl.load(base, mask=m, other=0.0)
    x2 = tl.load(base + HALF, mask=m, other=0.0)
    tl.store(base, (x1 * c - x2 * s).to(x1.dtype), mask=m)
    tl.store(base + HALF, (x2 * c + x1 * s).to(x1.dtype), mask=m)


def rotary_inplace(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] (strided views allowed; last dim contiguous) in place.
    cos/sin caches are [max_position, D] float32 with the two halves equal (only the first is read)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_cache, sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HALF=half,
        HEADS_PAD=triton.next_power_of_2(max(num_q_heads, num_k_heads)),
        HALF_PAD=triton.next_power_of_2(half), num_warps=4,
    )


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_kc_slot, stride_kc_head, stride_vc_slot, stride_vc_head,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, DIM_PAD)[None, :]
    m = (h < NUM_HEADS) & (d < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=m)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=m)
    tl.store(k_cache_ptr + slot * stride_kc_slot + h * stride_kc_head + d, k, mask=m)
    tl.store(v_cache_ptr + slot * stride_vc_slot + h * stride_vc_head + d, v, mask=m)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store k/v [T, Hkv, D] (strided views allowed) into caches [blocks, block_size, Hkv, D] at slots."""
    num_tokens, num_heads, head_dim = k.shape
    kc = k_cache.view(-1, num_heads, head_dim)
    vc = v_cache.view(-1, num_heads, head_dim)
    _write_kv_kernel[(num_tokens,)](
        k, v, kc, vc, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEADS_PAD=triton.next_power_of_2(num_heads),
        DIM_PAD=triton.next_power_of_2(head_dim), num_warps=4,
    )


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = [gate | up] -> silu(gate) * up [T, I]."""
    num_rows, width = x.shape
    n = width // 2
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    block = 1024
    _silu_and_mul_kernel[(num_rows, triton.cdiv(n, block))](x, out, n, x.stride(0), out.stride(0), BLOCK=block)
    return out
