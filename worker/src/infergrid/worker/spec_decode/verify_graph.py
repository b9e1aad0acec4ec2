"""CUDA graphs for verification batches: every sequence has 1 .. max_query_len query tokens.

A speculating request feeds 1 + k tokens per step, so its steps are not decode batches and would
miss the decode CUDA graphs (engine/cuda_graph.py). These graphs are captured per batch-size bucket
with room for bucket * max_query_len tokens, and serve any batch whose sequences each have at most
max_query_len query tokens (mixed draft lengths, short prefill chunks):

    tokens:  [ seq 0: 1+k | seq 1: 1 | seq 2: 1+j | ... | padding tokens -> null block 0 ]
    seqs:    real sequences, then dummies with 0 query tokens and seq_len 0 (the paged attention
             kernel does nothing for them); padding tokens' outputs are garbage and never read.

The attention grid is fixed at capture (query tiles for max_query_len), which is why the number of
query tokens per sequence is bounded, not the layout.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from infergrid.worker import envs
from infergrid.worker.engine.block_pool import NULL_BLOCK_ID
from infergrid.worker.engine.cuda_graph import graph_batch_sizes
from infergrid.worker.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from infergrid.worker.engine.model_runner import ModelRunner, _BatchInputs

logger = logging.getLogger(__name__)


class MultiTokenCUDAGraphRunner:
    """Captures and replays a runner's forward pass for batches of up to max_query_len tokens per sequence."""

    def __init__(self, runner: ModelRunner, max_query_len: int) -> None:
        if max_query_len < 2:
            raise ValueError(f"max_query_len must be >= 2 (decode batches have their own graphs), got {max_query_len}")
        self.runner = runner
        self.max_query_len = q = max_query_len
        limit = envs.cuda_graph_max_batch_size() or 512
        self.max_batch_size = min(runner.config.max_num_seqs, limit)
        self.batch_sizes = graph_batch_sizes(self.max_batch_size)
        dev, n = runner.device, self.max_batch_size
        self.input_ids = torch.zeros(n * q, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n * q, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n * q,), NULL_BLOCK_ID * runner.block_size, dtype=torch.int64, device=dev)
        self.seq_lens = torch.full((n,), q, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev) * q
        self.block_tables = torch.full((n, runner.max_blocks_per_seq), NULL_BLOCK_ID, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros(n * q, runner.model_config.hidden_size, dtype=runner.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_replays = 0

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

    @torch.inference_mode()
    def capture(self) -> None:
        model = self.runner.model
        start = time.monotonic()
        pool = None
        for bs in reversed(self.batch_sizes):
            meta, t = self._meta(bs), bs * self.max_query_len
            self.hidden[:t] = model(self.input_ids[:t], self.positions[:t], meta)  # warm-up / compile
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[:t] = model(self.input_ids[:t], self.positions[:t], meta)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs for up to %d query tokens per sequence (batch sizes %s) in %.1f s",
                    len(self.graphs), self.max_query_len, self.batch_sizes, time.monotonic() - start)

    def can_run(self, batch: _BatchInputs) -> bool:
        meta = batch.meta
        return (meta.has_kv_cache and meta.num_seqs <= self.max_batch_size
                and meta.max_query_len <= self.max_query_len
                and meta.block_tables.shape[1] <= self.block_tables.shape[1])

    def run(self, batch: _BatchInputs) -> torch.Tensor:
        """Replay the graph of the smallest bucket that holds the batch; returns hidden [T, hidden]."""
        meta = batch.meta
        n, t = meta.num_seqs, batch.input_ids.shape[0]
        bs = next(b for b in self.batch_sizes if b >= n)
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
        self.graphs[bs].replay()
        self.num_replays += 1
        return self.hidden[:t]
