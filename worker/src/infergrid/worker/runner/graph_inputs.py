"""A step's inputs into a CUDA graph's static buffers, in one kernel.

A graph replays on fixed buffers (runner/cuda_graph.py), so every step
first copies its inputs there: token ids, positions and slots (the padding up to the graph's token
count: position 0, the null slot), sequence lengths and query starts (the padding: dummy
sequences), block tables, with int64 -> int32 casts. As torch ops that is ~11 small launches, 111 us
of host time on an H200 host (bench/host_op_costs.py) while a synchronous step's device waits; here it
is one Triton launch (38 us). Without CUDA (tests, CPU workers) the same writes run as torch ops.

    tokens  [0, t) from the step, [t, token_end) padding
    seqs    [0, n) from the step, [n, bs) padding (seq_len `seq_pad`; query start t)
    tables  rows [0, n) x columns [0, width) from the step; rows [n, bs) get the null block in
            column 0 when `pad_table_rows` (decode graphs: dummy rows of length 1 read it)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infergrid.worker.engine.block_pool import NULL_BLOCK_ID
from infergrid.worker.layers.triton_guard import tl, triton


@dataclass
class GraphInputs:
    """A graph set's static input buffers (query_start_loc None: fixed at capture, decode graphs)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor | None = None


if triton is not None:

    # NOTE: no specialization on the integer values (1, multiples of 16) or on the pointers' alignment
    # (views at any offset of the step's flat upload): one compiled kernel serves every step, instead of
    # a compile (hundreds of ms) whenever a batch brings a new combination.
    @triton.jit(do_not_specialize=["n", "t", "token_end", "bs", "width", "null_slot", "seq_pad",
                                   "tab_src_stride", "tab_dst_stride"],
                do_not_specialize_on_alignment=["ids_src", "pos_src", "slot_src", "qsl_src", "sl_src", "tab_src"])
    def _stage_kernel(
        ids_src, pos_src, slot_src, qsl_src, sl_src, tab_src, tab_src_stride,
        ids_dst, pos_dst, slot_dst, qsl_dst, sl_dst, tab_dst, tab_dst_stride,
        n, t, token_end, bs, width, null_slot, seq_pad,
        HAS_QSL: tl.constexpr, PAD_TABLE_ROWS: tl.constexpr, NULL_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        section = tl.program_id(1)
        if section == 0:  # tokens
            real = offs < t
            ids = tl.load(ids_src + offs, mask=real)
            tl.store(ids_dst + offs, ids.to(ids_dst.dtype.element_ty), mask=real)
            pos = tl.load(pos_src + offs, mask=real, other=0)
            tl.store(pos_dst + offs, pos.to(pos_dst.dtype.element_ty), mask=offs < token_end)
            slot = tl.load(slot_src + offs, mask=real, other=0)
            slot = tl.where(real, slot, null_slot)
            tl.store(slot_dst + offs, slot.to(slot_dst.dtype.element_ty), mask=offs < token_end)
        elif section == 1:  # sequences
            seq_len = tl.load(sl_src + offs, mask=offs < n, other=0)
            seq_len = tl.where(offs < n, seq_len, seq_pad)
            tl.store(sl_dst + offs, seq_len.to(sl_dst.dtype.element_ty), mask=offs < bs)
            if HAS_QSL:
                start = tl.load(qsl_src + offs, mask=offs <= n, other=0)
                start = tl.where(offs <= n, start, t)
                tl.store(qsl_dst + offs, start.to(qsl_dst.dtype.element_ty), mask=offs <= bs)
        else:  # block tables
            real = offs < n * width
            row = offs // width
            col = offs % width
            block = tl.load(tab_src + row * tab_src_stride + col, mask=real)
            tl.store(tab_dst + row * tab_dst_stride + col, block.to(tab_dst.dtype.element_ty), mask=real)
            if PAD_TABLE_ROWS:
                pad_row = (n + offs).to(tl.int64)
                null = tl.zeros([BLOCK], dtype=tab_dst.dtype.element_ty) + NULL_BLOCK
                tl.store(tab_dst + pad_row * tab_dst_stride, null, mask=pad_row < bs)


def stage_graph_inputs(
    dst: GraphInputs, *, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
    seq_lens: torch.Tensor, block_tables: torch.Tensor, query_start_loc: torch.Tensor | None,
    token_end: int, batch_size: int, seq_pad: int, null_slot: int, pad_table_rows: bool,
) -> None:
    """Write one step's inputs (any integer dtypes) into `dst` with the padding of the module docstring.
    `query_start_loc` is required when `dst` has one; `block_tables` is [n, width] with unit column stride."""
    stage = _stage_triton if dst.input_ids.is_cuda and triton is not None else _stage_torch
    stage(dst, input_ids, positions, slot_mapping, seq_lens, block_tables, query_start_loc,
          token_end, batch_size, seq_pad, null_slot, pad_table_rows)


def _stage_triton(dst: GraphInputs, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                  seq_lens: torch.Tensor, block_tables: torch.Tensor, query_start_loc: torch.Tensor | None,
                  token_end: int, batch_size: int, seq_pad: int, null_slot: int, pad_table_rows: bool) -> None:
    n, width = block_tables.shape
    has_qsl = dst.query_start_loc is not None
    block = 1024
    grid = (triton.cdiv(max(token_end, batch_size + 1, n * width + batch_size), block), 3)
    _stage_kernel[grid](
        input_ids, positions, slot_mapping, query_start_loc if has_qsl else seq_lens, seq_lens, block_tables,
        block_tables.stride(0), dst.input_ids, dst.positions, dst.slot_mapping,
        dst.query_start_loc if has_qsl else dst.seq_lens, dst.seq_lens, dst.block_tables, dst.block_tables.stride(0),
        n, input_ids.shape[0], token_end, batch_size, width, null_slot, seq_pad,
        HAS_QSL=has_qsl, PAD_TABLE_ROWS=pad_table_rows, NULL_BLOCK=NULL_BLOCK_ID, BLOCK=block,
    )


def _stage_torch(dst: GraphInputs, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 seq_lens: torch.Tensor, block_tables: torch.Tensor, query_start_loc: torch.Tensor | None,
                 token_end: int, batch_size: int, seq_pad: int, null_slot: int, pad_table_rows: bool) -> None:
    n, width = block_tables.shape
    t = input_ids.shape[0]
    dst.input_ids[:t].copy_(input_ids, non_blocking=True)
    dst.positions[:t].copy_(positions, non_blocking=True)
    dst.positions[t:token_end].fill_(0)
    dst.slot_mapping[:t].copy_(slot_mapping, non_blocking=True)
    dst.slot_mapping[t:token_end].fill_(null_slot)
    dst.seq_lens[:n].copy_(seq_lens, non_blocking=True)
    dst.seq_lens[n:batch_size].fill_(seq_pad)
    if dst.query_start_loc is not None:
        assert query_start_loc is not None
        dst.query_start_loc[: n + 1].copy_(query_start_loc, non_blocking=True)
        dst.query_start_loc[n + 1 : batch_size + 1].fill_(t)
    dst.block_tables[:n, :width].copy_(block_tables, non_blocking=True)
    if pad_table_rows:
        dst.block_tables[n:batch_size, 0].fill_(NULL_BLOCK_ID)
