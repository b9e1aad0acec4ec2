"""CUDA graphs of a draft model's proposal made ahead, in the steady state: all k passes in one replay.

DraftProposer.propose_ahead queues the next proposal of a verification's requests right behind it
(ahead_proposer.py). In the steady state, every request is greedy and the draft's KV is valid up
to its last known token, so pass 1 has the same shape for all of them: the last known token and
k + 1 sampled tokens (the target's; padded with -1 for a request that verified fewer drafts). Then the whole proposal reads only
device tensors and runs as one graph per batch bucket:

    static inputs:  last_token, c0 (its position) [bs]; sampled [bs, k + 1] (-1 after a rejection);
                    block_tables [bs, W] (covering positions up to c0 + 2k)
    graph:          pass 1:  tokens [last, sampled...] at c0 .. c0 + k + 1 (metadata built on the
                             device); logits at the last token the target emitted, row 1 + accepted
                             (accepted = non-negative samples - 1) -> d1
                    pass j:  d_{j-1} at c0 + accepted + j -> d_j   (j = 2 .. k)
    static output:  drafts [bs, k] (`run` returns a copy)

Passes 2..k are the draft loop graph's (draft_loop_graph.py), this graph only puts pass 1 in front.
The host uploads four small arrays in one copy, one kernel stages them into the static buffers (the
target's sampled rows gathered, the padding written) and one graph runs: instead of ~45 kernels and two graphs
(no measurable change in tokens/s at batch 1 on an H200, where the step is GPU-bound by then). Padded
rows are dummy sequences at position 0 whose KV goes to the null block, as in runner/cuda_graph.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from infergrid.worker.engine.block_pool import NULL_BLOCK_ID
from infergrid.worker.layers.attention import AttentionMetadata
from infergrid.worker.layers.triton_guard import tl, triton
from infergrid.worker.runner.cuda_graph import GraphPool, GraphTarget
from infergrid.worker.sample.argmax import argmax_rows
from infergrid.worker.spec_decode.draft_loop_graph import DraftLoopGraphRunner, slot_mapping_of


class AheadGraphRunner(DraftLoopGraphRunner):
    """Captures and replays steady-state greedy proposals made ahead (see the module docstring)."""

    kind = "draft_ahead"
    what = "proposals made ahead"

    def __init__(self, runner: GraphTarget, num_drafts: int, max_batch_size: int | None = None,
                 pool: GraphPool | None = None) -> None:
        super().__init__(runner, num_drafts, max_batch_size, pool)
        self.query_len = q = num_drafts + 2
        dev, n = runner.device, self.max_batch_size
        self.last_token = torch.zeros(n, dtype=torch.int64, device=dev)
        self.c0 = torch.zeros(n, dtype=torch.int64, device=dev)
        self.sampled = torch.full((n, num_drafts + 1), -1, dtype=torch.int64, device=dev)
        # Pass 1's [bs * q] tokens and their metadata, filled in by the graph.
        self.first_input_ids = torch.zeros(n * q, dtype=torch.int64, device=dev)
        self.first_positions = torch.zeros(n * q, dtype=torch.int64, device=dev)
        self.first_slot_mapping = torch.full((n * q,), NULL_BLOCK_ID * runner.block_size, dtype=torch.int64,
                                             device=dev)
        self.first_seq_lens = torch.full((n,), q, dtype=torch.int32, device=dev)
        self.first_query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev) * q
        self.offsets = torch.arange(q, dtype=torch.int64, device=dev)
        self.rows = torch.arange(n, dtype=torch.int64, device=dev) * q
        self.emitted_rows = torch.zeros(n, dtype=torch.int64, device=dev)  # each request's last emitted token

    def make_forward(self, key: int) -> Callable[[], None]:
        bs = key
        runner = self.runner
        model, backend, block_size = runner.model, runner.backend, runner.block_size
        q = self.query_len
        n_tok = bs * q
        meta = AttentionMetadata(
            slot_mapping=self.first_slot_mapping[:n_tok], query_start_loc=self.first_query_start_loc[: bs + 1],
            seq_lens=self.first_seq_lens[:bs], block_tables=self.block_tables[:bs], max_query_len=q,
            max_seq_len=runner.max_model_len, block_size=block_size,
        )
        later_passes = self._later_passes(bs)

        def forward() -> None:
            self._first_pass_metadata(bs)
            backend.prepare(meta)  # no device work for the triton backend (capturable)
            hidden = model(self.first_input_ids[:n_tok], self.first_positions[:n_tok], meta)
            # Logits at the last token the target emits (row 1 + accepted of each request's q rows).
            argmax_rows(model.lm_head(hidden.index_select(0, self.emitted_rows[:bs])), out=self.drafts[:bs, 0])
            later_passes()

        return forward

    def _first_pass_metadata(self, bs: int) -> None:
        """Pass 1's tokens [last, sampled...] at c0 .. c0 + k + 1 with their slots and sequence lengths,
        each request's last emitted token's row (1 + accepted: its non-negative samples - 1) and d1's
        position (start = c0 + accepted + 2), for the first bs rows."""
        if self.c0.is_cuda and triton is not None:
            self._first_pass_metadata_triton(bs)
        else:
            self._first_pass_metadata_torch(bs)

    def _first_pass_metadata_triton(self, bs: int) -> None:
        q, tables = self.query_len, self.block_tables
        _first_pass_kernel[(bs,)](
            self.c0, self.last_token, self.sampled, tables, tables.stride(0), self.first_input_ids,
            self.first_positions, self.first_slot_mapping, self.first_seq_lens, self.emitted_rows, self.start,
            Q=q, Q_POW2=triton.next_power_of_2(q), BLOCK_SIZE=self.runner.block_size)

    def _first_pass_metadata_torch(self, bs: int) -> None:
        q, block_size = self.query_len, self.runner.block_size
        n_tok = bs * q
        c0 = self.c0[:bs]
        positions = c0[:, None] + self.offsets  # [bs, q]
        self.first_positions[:n_tok] = positions.view(-1)
        self.first_slot_mapping[:n_tok] = slot_mapping_of(
            self.block_tables[:bs].to(torch.int64), positions, block_size).view(-1)
        self.first_seq_lens[:bs] = (c0 + q).to(torch.int32)
        ids = self.first_input_ids[:n_tok].view(bs, q)
        ids[:, 0] = self.last_token[:bs]
        ids[:, 1:] = self.sampled[:bs].clamp(min=0)
        accepted = (self.sampled[:bs] >= 0).sum(dim=1) - 1
        self.emitted_rows[:bs] = self.rows[:bs] + 1 + accepted
        self.start[:bs] = c0 + accepted + 2  # d1's position: right after the last token emitted

    def run(self, flat: torch.Tensor, sampled: torch.Tensor, n: int, width: int) -> torch.Tensor:  # type: ignore[override]
        """Propose for n requests: `flat` (int64, on the device) holds their last known tokens [n], those
        tokens' positions c0 [n], for each k + 1 rows of `sampled` to take (a row past its end: -1) and
        their block tables [n, width]; `sampled` is the verification's int64 output. Returns drafts
        [n, k] (a copy of the static output)."""
        bs = next(b for b in self.batch_sizes if b >= n)
        stage = self._stage_triton if flat.is_cuda and triton is not None else self._stage_torch
        stage(flat, sampled, n, width, bs)
        self.replay(bs)
        return self.drafts[:n].clone()

    def _pad_width(self, width: int) -> int:
        """Block-table columns of a dummy row to fill: its passes read positions up to q + k - 1."""
        return max(width, (self.query_len + self.num_drafts) // self.runner.block_size + 1)

    def _stage_triton(self, flat: torch.Tensor, sampled: torch.Tensor, n: int, width: int, bs: int) -> None:
        k1, pad_width, block = self.num_drafts + 1, self._pad_width(width), 1024
        grid = (triton.cdiv(max(bs * k1, bs * pad_width), block), 3)
        _stage_ahead_kernel[grid](
            flat, sampled, self.last_token, self.c0, self.sampled, self.block_tables, self.block_tables.stride(0),
            n, bs, width, pad_width, sampled.shape[0], K1=k1, NULL_BLOCK=NULL_BLOCK_ID, BLOCK=block,
        )

    def _stage_torch(self, flat: torch.Tensor, sampled: torch.Tensor, n: int, width: int, bs: int) -> None:
        k1 = self.num_drafts + 1
        last_t, c0_t, src_t, tables_t = flat.split([n, n, n * k1, n * width])
        padded = torch.cat([sampled, sampled.new_full((1,), -1)])
        self.last_token[:n].copy_(last_t)
        self.c0[:n].copy_(c0_t)
        self.c0[n:bs].fill_(0)
        self.sampled[:n].copy_(padded[src_t.clamp(max=sampled.shape[0])].view(n, k1))
        self.sampled[n:bs].fill_(-1)
        self.block_tables[:n, :width].copy_(tables_t.view(n, width))
        self.block_tables[n:bs, : self._pad_width(width)].fill_(NULL_BLOCK_ID)


if triton is not None:

    @triton.jit(do_not_specialize=["tab_stride", "n", "bs", "width", "pad_width", "num_sampled"],
                do_not_specialize_on_alignment=["flat_ptr", "sampled_ptr"])  # (graph_inputs.py's NOTE)
    def _stage_ahead_kernel(
        flat_ptr, sampled_ptr, last_dst, c0_dst, sampled_dst, tab_dst, tab_stride,
        n, bs, width, pad_width, num_sampled,
        K1: tl.constexpr, NULL_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """AheadGraphRunner.run's inputs into the static buffers (its torch branch writes the same)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        section = tl.program_id(1)
        if section == 0:  # per request: last token, c0 (dummy rows: 0)
            real = offs < n
            last = tl.load(flat_ptr + offs, mask=real, other=0)
            c0 = tl.load(flat_ptr + n + offs, mask=real, other=0)
            tl.store(last_dst + offs, last, mask=real)
            tl.store(c0_dst + offs, c0, mask=offs < bs)
        elif section == 1:  # sampled rows (a source past the step's rows, or a dummy row: -1)
            real = offs < n * K1
            src = tl.load(flat_ptr + 2 * n + offs, mask=real, other=num_sampled)
            in_step = real & (src < num_sampled)
            tok = tl.load(sampled_ptr + src, mask=in_step, other=-1)
            tl.store(sampled_dst + offs, tl.where(in_step, tok, -1), mask=offs < bs * K1)
        else:  # block tables (int64 -> int32); dummy rows: the null block
            real = offs < n * width
            row = offs // width
            col = offs % width
            block = tl.load(flat_ptr + (2 + K1) * n + offs, mask=real, other=0)
            tl.store(tab_dst + row * tab_stride + col, block.to(tab_dst.dtype.element_ty), mask=real)
            pad_row = n + offs // pad_width
            pad_col = offs % pad_width
            null = tl.zeros([BLOCK], dtype=tab_dst.dtype.element_ty) + NULL_BLOCK
            tl.store(tab_dst + pad_row * tab_stride + pad_col, null, mask=pad_row < bs)

    @triton.jit
    def _first_pass_kernel(
        c0_ptr, last_ptr, sampled_ptr, tab_ptr, tab_stride, ids_ptr, pos_ptr, slot_ptr, seq_ptr, emitted_ptr, start_ptr,
        Q: tl.constexpr, Q_POW2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        """AheadGraphRunner._first_pass_metadata for one request (its torch branch writes the same)."""
        row = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, Q_POW2)
        in_q = j < Q
        c0 = tl.load(c0_ptr + row)
        pos = c0 + j
        # sampled is [rows, Q - 1]: token j >= 1 is sample j - 1 (-1 after a rejection: any token will do)
        sample = tl.load(sampled_ptr + row * (Q - 1) + j - 1, mask=in_q & (j >= 1), other=-1)
        last = tl.load(last_ptr + row)
        tokens = tl.where(j == 0, last, tl.maximum(sample, 0))
        block = tl.load(tab_ptr + row * tab_stride + pos // BLOCK_SIZE, mask=in_q, other=0).to(tl.int64)
        tl.store(ids_ptr + row * Q + j, tokens, mask=in_q)
        tl.store(pos_ptr + row * Q + j, pos, mask=in_q)
        tl.store(slot_ptr + row * Q + j, block * BLOCK_SIZE + pos % BLOCK_SIZE, mask=in_q)
        tl.store(seq_ptr + row, (c0 + Q).to(tl.int32))
        accepted = tl.sum((sample >= 0).to(tl.int64), axis=0) - 1
        tl.store(emitted_ptr + row, row * Q + 1 + accepted)
        tl.store(start_ptr + row, c0 + accepted + 2)
