"""Row-wise argmax over a large vocabulary: greedy sampling, and a draft model's greedy drafts.

x [B, V] -> [B] int64, the first index of each row's maximum, as `x.argmax(dim=-1)` (NaN aside: a
NaN is skipped here, where torch returns its index). A one-row argmax over 128k logits is one thread
block's work in PyTorch's reduction (~27 us on an H200), so both paths work in two stages, chunks
of a row and then the best chunk:

    CUDA (Triton)   stage 1, grid (B, chunks): each chunk's max and its first index
                    stage 2, grid (B,): the best chunk (ties: the first) -> out[row]   (2 launches)
    elsewhere       max over groups of the row, argmax of the groups, gather        (torch ops)

`out` may be a strided view (a column of a graph's static drafts buffer): the kernel writes there
directly, saving the copy. Stage 1 reads any float dtype, so a bf16 LM head's logits need no
float32 cast first.
"""

from __future__ import annotations

import torch

from infergrid.worker.layers.triton_guard import tl, triton

_CHUNK = 2048  # logits per stage-1 program (a multiple of _BLOCK)
_BLOCK = 1024
_MAX_CHUNKS = 128


def argmax_rows(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, V] -> [B] int64 (written to `out` when given, and returned): see the module docstring."""
    if x.is_cuda and triton is not None and x.shape[1] <= _CHUNK * _MAX_CHUNKS:
        return _argmax_rows_triton(x, out)
    result = _argmax_rows_torch(x)
    if out is None:
        return result
    out.copy_(result)
    return out


def _argmax_rows_torch(x: torch.Tensor) -> torch.Tensor:
    num_rows, vocab = x.shape
    groups = next((g for g in (128, 64, 32) if vocab % g == 0 and vocab // g >= 64), None)
    if groups is None or num_rows * groups > 8192:  # (a large batch fills the GPU anyway)
        return x.argmax(dim=-1)
    width = vocab // groups
    values, within = x.reshape(num_rows, groups, width).max(dim=-1)
    group = values.argmax(dim=-1, keepdim=True)
    return group[:, 0] * width + within.gather(1, group)[:, 0]


def _argmax_rows_triton(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    num_rows, vocab = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(num_rows, dtype=torch.int64, device=x.device)
    if num_rows == 0:
        return out
    chunks = triton.cdiv(vocab, _CHUNK)
    values = torch.empty(num_rows, chunks, dtype=torch.float32, device=x.device)
    indices = torch.empty(num_rows, chunks, dtype=torch.int32, device=x.device)
    _argmax_chunks_kernel[(num_rows, chunks)](x, x.stride(0), vocab, values, indices, CHUNKS=chunks,
                                              CHUNK=_CHUNK, BLOCK=_BLOCK)
    _argmax_best_chunk_kernel[(num_rows,)](values, indices, out, out.stride(0), CHUNKS=chunks,
                                           CHUNKS_POW2=triton.next_power_of_2(chunks))
    return out


if triton is not None:

    # NOTE: no specialization on the strides or the pointers' alignment (graph_inputs.py's NOTE).
    @triton.jit(do_not_specialize=["x_stride", "vocab"], do_not_specialize_on_alignment=["x_ptr"])
    def _argmax_chunks_kernel(x_ptr, x_stride, vocab, values_ptr, indices_ptr,
                              CHUNKS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        lanes = tl.arange(0, BLOCK)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_index = chunk * CHUNK + lanes  # (an all -inf chunk reports its first index)
        for start in tl.static_range(0, CHUNK, BLOCK):
            idx = chunk * CHUNK + start + lanes
            v = tl.load(x_ptr + row * x_stride + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
            better = v > best  # strictly: a lane keeps its first maximum
            best = tl.where(better, v, best)
            best_index = tl.where(better, idx, best_index)
        top = tl.max(best, axis=0)
        first = tl.min(tl.where(best == top, best_index, 2147483647), axis=0)
        tl.store(values_ptr + row * CHUNKS + chunk, top)
        tl.store(indices_ptr + row * CHUNKS + chunk, first)

    @triton.jit(do_not_specialize=["out_stride"], do_not_specialize_on_alignment=["out_ptr"])
    def _argmax_best_chunk_kernel(values_ptr, indices_ptr, out_ptr, out_stride,
                                  CHUNKS: tl.constexpr, CHUNKS_POW2: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, CHUNKS_POW2)
        v = tl.load(values_ptr + row * CHUNKS + c, mask=c < CHUNKS, other=float("-inf"))
        i = tl.load(indices_ptr + row * CHUNKS + c, mask=c < CHUNKS, other=2147483647)
        top = tl.max(v, axis=0)
        first = tl.min(tl.where(v == top, i, 2147483647), axis=0)  # chunks are in index order
        tl.store(out_ptr + row * out_stride, first.to(tl.int64))
