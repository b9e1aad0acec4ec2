"""CUDA graphs of a draft model's proposal made ahead, in the steady state: all k passes in one replay.

DraftProposer.propose_ahead queues the next proposal of every greedy request right behind the
target's verification (draft_proposer.py). In the steady state, every request verifies k drafts and
the draft's KV is valid up to its last known token, so pass 1 has the same shape for all of them:
the last known token and the k + 1 tokens the target samples. Then the whole proposal reads only
device tensors and runs as one graph per batch bucket:

    static inputs:  last_token, c0 (its position) [bs]; sampled [bs, k + 1] (-1 after a rejection);
                    block_tables [bs, W] (covering positions up to c0 + 2k)
    graph:          pass 1:  tokens [last, sampled...] at c0 .. c0 + k + 1 (metadata built on the
                             device); logits at the last token the target emitted, row 1 + accepted
                             (accepted = non-negative samples - 1) -> d1
                    pass j:  d_{j-1} at c0 + accepted + j -> d_j   (j = 2 .. k)
    static output:  drafts [bs, k] (`run` returns a copy)

The host then only uploads four small arrays and launches one graph instead of ~45 kernels and two
graphs (~0.6 ms of host time per step on an H200 machine at batch 1). Padded rows are dummy
sequences at position 0 whose KV goes to the null block, as in engine/cuda_graph.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from infergrid.worker.engine.block_pool import NULL_BLOCK_ID
from infergrid.worker.engine.cuda_graph import GraphSet, decode_metadata
from infergrid.worker.layers.attention import AttentionMetadata
from infergrid.worker.layers.sampler import argmax_rows

if TYPE_CHECKING:
    from infergrid.worker.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class AheadGraphRunner(GraphSet):
    """Captures and replays steady-state greedy proposals made ahead (see the module docstring)."""

    kind = "draft_ahead"

    def __init__(self, runner: ModelRunner, num_drafts: int, max_batch_size: int | None = None) -> None:
        super().__init__(runner, max_batch_size)
        self.num_drafts = k = num_drafts
        self.query_len = q = k + 2
        dev, n, null_slot = runner.device, self.max_batch_size, NULL_BLOCK_ID * runner.block_size
        self.last_token = torch.zeros(n, dtype=torch.int64, device=dev)
        self.c0 = torch.zeros(n, dtype=torch.int64, device=dev)
        self.sampled = torch.full((n, k + 1), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.full((n, runner.max_blocks_per_seq), NULL_BLOCK_ID, dtype=torch.int32, device=dev)
        self.drafts = torch.zeros(n, k, dtype=torch.int64, device=dev)
        # Pass 1 ([bs * q] tokens) and passes 2..k ([k - 1, bs]): metadata the graph fills in.
        self.input_ids = torch.zeros(n * q, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n * q, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n * q,), null_slot, dtype=torch.int64, device=dev)
        self.seq_lens = torch.full((n,), q, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev) * q
        self.later_positions = torch.zeros(max(k - 1, 1), n, dtype=torch.int64, device=dev)
        self.later_slots = torch.full((max(k - 1, 1), n), null_slot, dtype=torch.int64, device=dev)
        self.later_seq_lens = torch.ones(max(k - 1, 1), n, dtype=torch.int32, device=dev)
        self.later_query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.offsets = torch.arange(q, dtype=torch.int64, device=dev)
        self.rows = torch.arange(n, dtype=torch.int64, device=dev) * q

    def _make_forward(self, bs: int) -> Callable[[], None]:
        runner = self.runner
        model, backend, block_size = runner.model, runner.backend, runner.block_size
        k, q = self.num_drafts, self.query_len
        first = AttentionMetadata(
            slot_mapping=self.slot_mapping[: bs * q], query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], max_query_len=q,
            max_seq_len=runner.max_model_len, block_size=block_size,
        )
        later = [
            decode_metadata(runner, self.later_slots[j, :bs], self.later_query_start_loc[: bs + 1],
                            self.later_seq_lens[j, :bs], self.block_tables[:bs])
            for j in range(k - 1)
        ]

        def slots(tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return tables.gather(1, positions // block_size) * block_size + positions % block_size

        def forward() -> None:
            tables, c0 = self.block_tables[:bs].to(torch.int64), self.c0[:bs]
            positions = c0[:, None] + self.offsets  # [bs, q]
            self.positions[: bs * q] = positions.view(-1)
            self.slot_mapping[: bs * q] = slots(tables, positions).view(-1)
            self.seq_lens[:bs] = (c0 + q).to(torch.int32)
            ids = self.input_ids[: bs * q].view(bs, q)
            ids[:, 0] = self.last_token[:bs]
            ids[:, 1:] = self.sampled[:bs].clamp(min=0)
            backend.prepare(first)  # no device work for the triton backend (capturable)
            hidden = model(self.input_ids[: bs * q], self.positions[: bs * q], first)
            accepted = (self.sampled[:bs] >= 0).sum(dim=1) - 1
            self.drafts[:bs, 0] = argmax_rows(model.compute_logits(hidden[self.rows[:bs] + 1 + accepted]))
            start = c0 + accepted + 2  # d1's position
            for j, meta in enumerate(later):
                pos = start + j
                self.later_positions[j, :bs] = pos
                self.later_slots[j, :bs] = slots(tables, pos[:, None])[:, 0]
                self.later_seq_lens[j, :bs] = (pos + 1).to(torch.int32)
                backend.prepare(meta)
                out = model(self.drafts[:bs, j], self.later_positions[j, :bs], meta)
                self.drafts[:bs, j + 1] = argmax_rows(model.compute_logits(out))

        return forward

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.monotonic()
        self.capture_all(self.runner.device, self.batch_sizes, self._make_forward)
        logger.info("captured %d CUDA graphs of proposals made ahead (%d drafts; batch sizes %s) in %.1f s",
                    len(self.graphs), self.num_drafts, self.batch_sizes, time.monotonic() - start)

    def fits(self, num_seqs: int, num_block_columns: int) -> bool:
        return bool(self.graphs) and num_seqs <= self.max_batch_size and num_block_columns <= self.block_tables.shape[1]

    def run(self, last_token: torch.Tensor, c0: torch.Tensor, sampled: torch.Tensor,
            block_tables: torch.Tensor) -> torch.Tensor:
        """last_token, c0 [n] int64; sampled [n, k + 1] int64; block_tables [n, W] int32 ->
        drafts [n, k] (a copy of the static output)."""
        n = last_token.shape[0]
        bs = next(b for b in self.batch_sizes if b >= n)
        width = block_tables.shape[1]
        self.last_token[:n].copy_(last_token, non_blocking=True)
        self.c0[:n].copy_(c0, non_blocking=True)
        self.sampled[:n].copy_(sampled, non_blocking=True)
        self.block_tables[:n, :width].copy_(block_tables, non_blocking=True)
        if n < bs:  # dummy rows: position 0, the null block
            self.c0[n:bs].fill_(0)
            self.sampled[n:bs].fill_(-1)
            self.block_tables[n:bs].fill_(NULL_BLOCK_ID)
        self.replay(bs)
        return self.drafts[:n].clone()
