"""CUDA graphs of a draft model's later passes: passes 2..k of a greedy proposal step in one replay.

After its first pass (the catch-up, which gives each proposing request its first draft), a proposal
step's passes are decode passes of the same rows: the previous pass's drafts in, their argmax out
(draft_proposer.py). When every proposing row is greedy and drafts max_k tokens (a request's first
proposals; proposals made ahead in the steady state are one graph of their own, ahead_graph.py),
DraftProposer runs them as one graph per batch bucket:

    static inputs:  drafts[:, 0] (first drafts) [bs]; positions, slot_mapping, seq_lens [k - 1, bs];
                    block_tables [bs, W]
    graph:          for j in 1 .. k-1:  hidden = model(drafts[:, j-1], positions[j-1], pass j's metadata)
                                        drafts[:, j] = argmax(lm_head(hidden))
    static output:  drafts [bs, k] (`run` returns a copy: drafts may wait a step or two to be verified)

so the later passes cost one replay instead of k - 1 (each with its input copies, an eager LM head
and an argmax). Padded rows are dummy sequences of length 1 writing to the null block, as in
engine/cuda_graph.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from infergrid.worker.engine.block_pool import NULL_BLOCK_ID
from infergrid.worker.engine.cuda_graph import GraphSet, decode_metadata
from infergrid.worker.layers.sampler import argmax_rows

if TYPE_CHECKING:
    from infergrid.worker.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class DraftLoopGraphRunner(GraphSet):
    """Captures and replays passes 2..num_drafts of greedy proposal steps (see the module docstring)."""

    kind = "draft_loop"

    def __init__(self, runner: ModelRunner, num_drafts: int, max_batch_size: int | None = None) -> None:
        if num_drafts < 2:
            raise ValueError(f"num_drafts must be >= 2 (one draft has no later passes), got {num_drafts}")
        super().__init__(runner, max_batch_size)
        self.num_drafts = num_drafts
        dev, n, p = runner.device, self.max_batch_size, num_drafts - 1
        self.drafts = torch.zeros(n, num_drafts, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(p, n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((p, n), NULL_BLOCK_ID * runner.block_size, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(p, n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((n, runner.max_blocks_per_seq), NULL_BLOCK_ID, dtype=torch.int32, device=dev)

    def _make_forward(self, bs: int) -> Callable[[], None]:
        runner = self.runner
        model, backend = runner.model, runner.backend
        metas = [
            decode_metadata(runner, self.slot_mapping[j, :bs], self.query_start_loc[: bs + 1],
                            self.seq_lens[j, :bs], self.block_tables[:bs])
            for j in range(self.num_drafts - 1)
        ]

        def forward() -> None:
            for j, meta in enumerate(metas):
                backend.prepare(meta)  # no device work for the triton backend (capturable)
                hidden = model(self.drafts[:bs, j], self.positions[j, :bs], meta)
                self.drafts[:bs, j + 1] = argmax_rows(model.compute_logits(hidden))

        return forward

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.monotonic()
        self.capture_all(self.runner.device, self.batch_sizes, self._make_forward)
        logger.info("captured %d CUDA graphs of %d draft passes each (batch sizes %s) in %.1f s",
                    len(self.graphs), self.num_drafts - 1, self.batch_sizes, time.monotonic() - start)

    def fits(self, num_seqs: int, num_block_columns: int) -> bool:
        return bool(self.graphs) and num_seqs <= self.max_batch_size and num_block_columns <= self.block_tables.shape[1]

    def run(self, first_drafts: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            seq_lens: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """first_drafts [n]; positions, slot_mapping [k - 1, n] int64; seq_lens [k - 1, n] int32;
        block_tables [n, W] int32 -> drafts [n, k] (a copy of the static output)."""
        n = first_drafts.shape[0]
        bs = next(b for b in self.batch_sizes if b >= n)
        width = block_tables.shape[1]
        self.drafts[:n, 0].copy_(first_drafts, non_blocking=True)
        self.positions[:, :n].copy_(positions, non_blocking=True)
        self.slot_mapping[:, :n].copy_(slot_mapping, non_blocking=True)
        self.seq_lens[:, :n].copy_(seq_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(block_tables, non_blocking=True)
        if n < bs:  # dummy rows
            self.positions[:, n:bs].fill_(0)
            self.slot_mapping[:, n:bs].fill_(NULL_BLOCK_ID * self.runner.block_size)
            self.seq_lens[:, n:bs].fill_(1)
            self.block_tables[n:bs, 0].fill_(NULL_BLOCK_ID)
        self.replay(bs)
        return self.drafts[:n].clone()
