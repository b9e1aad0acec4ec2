"""CUDA graphs for verification batches: every sequence has 1 .. max_query_len query tokens.

A speculating request feeds 1 + k tokens per step, so its steps are not decode batches and would
miss the decode CUDA graphs (engine/cuda_graph.py). These graphs are captured per batch-size bucket
with room for bucket * max_query_len tokens, and serve any batch whose sequences each have at most
max_query_len query tokens (mixed draft lengths, short prefill chunks):

    tokens:  [ seq 0: 1+k | seq 1: 1 | seq 2: 1+j | ... | padding tokens -> null block 0 ]
    seqs:    real sequences, then dummies with 0 query tokens and seq_len 0 (the paged attention
             kernel does nothing for them); padding tokens' outputs are garbage and never read.

The attention grid is fixed at capture (query tiles for max_query_len), which is why the number of
query tokens per sequence is bounded, not the layout. Capture, replay and release go through
engine/cuda_graph.py's GraphSet (same order on every tensor-parallel rank, released before NCCL teardown).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from infergrid.worker.engine.block_pool import NULL_BLOCK_ID
from infergrid.worker.engine.cuda_graph import GraphSet, default_max_batch_size, graph_batch_sizes
from infergrid.worker.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from infergrid.worker.engine.model_runner import ModelRunner, _BatchInputs

logger = logging.getLogger(__name__)


class MultiTokenCUDAGraphRunner(GraphSet):
    """Captures and replays a runner's forward pass for batches of up to max_query_len tokens per sequence."""

    kind = "multi_token"

    def __init__(self, runner: ModelRunner, max_query_len: int, max_batch_size: int | None = None) -> None:
        if max_query_len < 2:
            raise ValueError(f"max_query_len must be >= 2 (decode batches have their own graphs), got {max_query_len}")
        super().__init__()
        self.runner = runner
        self.max_query_len = q = max_query_len
        self.max_batch_size = max_batch_size or default_max_batch_size(runner.config.max_num_seqs)
        self.batch_sizes = graph_batch_sizes(self.max_batch_size)
        dev, n = runner.device, self.max_batch_size
        self.input_ids = torch.zeros(n * q, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n * q, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n * q,), NULL_BLOCK_ID * runner.block_size, dtype=torch.int64, device=dev)
        self.seq_lens = torch.full((n,), q, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev) * q
        self.block_tables = torch.full((n, runner.max_blocks_per_seq), NULL_BLOCK_ID, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros(n * q, runner.model_config.hidden_size, dtype=runner.dtype, device=dev)

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[: bs * self.max_query_len],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=self.max_query_len,
            max_seq_len=self.runner.max_model_len,
            block_size=self.runner.block_size,
        )

    def _make_forward(self, bs: int) -> Callable[[], None]:
        model, backend = self.runner.model, self.runner.backend
        meta, t = self._meta(bs), bs * self.max_query_len

        def forward() -> None:
            backend.prepare(meta)  # no device work for the triton backend (capturable)
            self.hidden[:t] = model(self.input_ids[:t], self.positions[:t], meta)

        return forward

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.monotonic()
        self.capture_all(self.runner.device, self.batch_sizes, self._make_forward)
        logger.info("captured %d CUDA graphs for up to %d query tokens per sequence (batch sizes %s) in %.1f s",
                    len(self.graphs), self.max_query_len, self.batch_sizes, time.monotonic() - start)

    def bucket(self, num_seqs: int, max_query_len: int, num_block_columns: int) -> int | None:
        """Batch size of the graph that serves such a batch (None: none does)."""
        if (not self.graphs or max_query_len > self.max_query_len
                or num_block_columns > self.block_tables.shape[1]):
            return None
        return next((b for b in self.batch_sizes if b >= num_seqs), None)

    def can_run(self, batch: _BatchInputs) -> bool:
        meta = batch.meta
        return meta.has_kv_cache and self.bucket(meta.num_seqs, meta.max_query_len,
                                                 meta.block_tables.shape[1]) is not None

    def run(self, batch: _BatchInputs, bs: int | None = None) -> torch.Tensor:
        """Replay the graph of `bs` (default: the smallest bucket that holds the batch); returns
        hidden [T, hidden]."""
        meta = batch.meta
        n, t = meta.num_seqs, batch.input_ids.shape[0]
        bs = bs or next(b for b in self.batch_sizes if b >= n)
        cap = bs * self.max_query_len
        width = meta.block_tables.shape[1]
        self.input_ids[:t].copy_(batch.input_ids, non_blocking=True)
        self.positions[:t].copy_(batch.positions, non_blocking=True)
        self.positions[t:cap].fill_(0)
        self.slot_mapping[:t].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[t:cap].fill_(NULL_BLOCK_ID * self.runner.block_size)
        self.query_start_loc[: n + 1].copy_(meta.query_start_loc, non_blocking=True)
        self.query_start_loc[n + 1 : bs + 1].fill_(t)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[n:bs].fill_(0)
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        self.replay(bs)
        return self.hidden[:t]
