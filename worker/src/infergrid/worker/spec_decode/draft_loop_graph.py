"""CUDA graphs of a draft model's later passes: passes 2..k of a greedy proposal step in one replay.

After its first pass (the catch-up, which gives each proposing request its first draft), a proposal
step's passes are decode passes of the same rows: the previous pass's drafts in, their argmax out
(draft_passes.py). When every proposing row is greedy and drafts max_k tokens, the proposer runs
them as one graph per batch bucket:

    static inputs:  drafts[:, 0] (first drafts), start (d1's position) [bs]; block_tables [bs, W]
    graph:          for j in 1 .. k-1:  pass j's positions (start + j - 1), slots, seq lens
                                        hidden = model(drafts[:, j-1], positions, pass j's metadata)
                                        drafts[:, j] = argmax(lm_head(hidden))
    static output:  drafts [bs, k] (`run` returns a copy: drafts may wait a step or two to be verified)

so the later passes cost one replay instead of k - 1 (each with its input copies, an eager LM head
and an argmax); their metadata is computed in the graph from `start` and the block tables. Padded
rows are dummy sequences at position 0 writing to the null block, as in runner/cuda_graph.py.
Proposals made ahead in the steady state add pass 1 in front (ahead_graph.py). Both are GraphSets
(runner/cuda_graph.py) of the draft's runner: captured by it (`ModelRunner.add_graphs`) into its
memory pool, released with its other graphs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from infergrid.worker.engine.block_pool import NULL_BLOCK_ID
from infergrid.worker.layers.triton_guard import tl, triton
from infergrid.worker.runner.cuda_graph import GraphPool, GraphSet, GraphTarget, decode_metadata
from infergrid.worker.sample.argmax import argmax_rows


def slot_mapping_of(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """KV slots of `positions` [rows, m] through int64 `block_tables` [rows, W] (on the device)."""
    return block_tables.gather(1, positions // block_size) * block_size + positions % block_size


class DraftLoopGraphRunner(GraphSet):
    """Captures and replays passes 2..num_drafts of greedy proposal steps (see the module docstring)."""

    kind = "draft_loop"
    what = "draft passes 2..k"

    def __init__(self, runner: GraphTarget, num_drafts: int, max_batch_size: int | None = None,
                 pool: GraphPool | None = None) -> None:
        super().__init__(runner, max_batch_size, pool)
        self.num_drafts = num_drafts
        dev, n, p = runner.device, self.max_batch_size, max(num_drafts - 1, 1)
        self.drafts = torch.zeros(n, num_drafts, dtype=torch.int64, device=dev)
        self.start = torch.zeros(n, dtype=torch.int64, device=dev)
        self.block_tables = torch.full((n, runner.max_blocks_per_seq), NULL_BLOCK_ID, dtype=torch.int32, device=dev)
        # Passes 2..k's metadata ([k - 1, bs]), filled in by the graph.
        self.positions = torch.zeros(p, n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((p, n), NULL_BLOCK_ID * runner.block_size, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(p, n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)

    def _later_passes(self, bs: int) -> Callable[[], None]:
        """Passes 2..k of the first bs rows, from drafts[:, 0], start and block_tables (capturable)."""
        runner = self.runner
        model, backend = runner.model, runner.backend
        metas = [
            decode_metadata(runner, self.slot_mapping[j, :bs], self.query_start_loc[: bs + 1],
                            self.seq_lens[j, :bs], self.block_tables[:bs])
            for j in range(self.num_drafts - 1)
        ]

        def passes() -> None:
            for j, meta in enumerate(metas):
                self._pass_metadata(bs, j)
                backend.prepare(meta)  # no device work for the triton backend (capturable)
                hidden = model(self.drafts[:bs, j], self.positions[j, :bs], meta)
                # (argmax of the LM head's own dtype: the float32 cast of compute_logits changes no maximum)
                argmax_rows(model.lm_head(hidden), out=self.drafts[:bs, j + 1])

        return passes

    def _pass_metadata(self, bs: int, j: int) -> None:
        """Pass j + 2's positions (start + j), KV slots and sequence lengths of the first bs rows."""
        if self.start.is_cuda and triton is not None:
            self._pass_metadata_triton(bs, j)
        else:
            self._pass_metadata_torch(bs, j)

    def _pass_metadata_triton(self, bs: int, j: int) -> None:
        tables = self.block_tables
        _pass_metadata_kernel[(triton.cdiv(bs, 128),)](
            self.start, tables, tables.stride(0), self.positions[j], self.slot_mapping[j], self.seq_lens[j],
            j, bs, BLOCK_SIZE=self.runner.block_size, BLOCK=128)

    def _pass_metadata_torch(self, bs: int, j: int) -> None:
        positions = self.start[:bs] + j
        self.positions[j, :bs] = positions
        tables = self.block_tables[:bs].to(torch.int64)
        self.slot_mapping[j, :bs] = slot_mapping_of(tables, positions[:, None], self.runner.block_size)[:, 0]
        self.seq_lens[j, :bs] = (positions + 1).to(torch.int32)

    def make_forward(self, key: int) -> Callable[[], None]:
        return self._later_passes(key)

    def describe(self) -> str:
        return f"{self.what} ({self.num_drafts} drafts; batch sizes {self.batch_sizes})"

    def fits(self, num_seqs: int, num_block_columns: int) -> bool:
        return bool(self.graphs) and num_seqs <= self.max_batch_size and num_block_columns <= self.block_tables.shape[1]

    def _replay_rows(self, n: int, block_tables: torch.Tensor) -> torch.Tensor:
        """Copy in the block tables, make rows n.. of the bucket dummies (position 0, the null
        block), replay; returns drafts [n, k] (a copy of the static output)."""
        bs = next(b for b in self.batch_sizes if b >= n)
        self.block_tables[:n, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        if n < bs:
            self.start[n:bs].fill_(0)
            self.block_tables[n:bs].fill_(NULL_BLOCK_ID)
        self.replay(bs)
        return self.drafts[:n].clone()

    def run(self, first_drafts: torch.Tensor, start: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """first_drafts, start (d1's position) [n] int64; block_tables [n, W] int32 -> drafts [n, k]."""
        n = first_drafts.shape[0]
        self.drafts[:n, 0].copy_(first_drafts, non_blocking=True)
        self.start[:n].copy_(start, non_blocking=True)
        return self._replay_rows(n, block_tables)


if triton is not None:

    @triton.jit(do_not_specialize=["tab_stride", "j", "bs"])
    def _pass_metadata_kernel(start_ptr, tab_ptr, tab_stride, pos_ptr, slot_ptr, seq_ptr, j, bs,
                              BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
        """DraftLoopGraphRunner._pass_metadata (its torch branch writes the same): one launch for ~8 ops."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        real = rows < bs
        pos = tl.load(start_ptr + rows, mask=real, other=0) + j
        block = tl.load(tab_ptr + rows * tab_stride + pos // BLOCK_SIZE, mask=real, other=0).to(tl.int64)
        tl.store(pos_ptr + rows, pos, mask=real)
        tl.store(slot_ptr + rows, block * BLOCK_SIZE + pos % BLOCK_SIZE, mask=real)
        tl.store(seq_ptr + rows, (pos + 1).to(tl.int32), mask=real)
