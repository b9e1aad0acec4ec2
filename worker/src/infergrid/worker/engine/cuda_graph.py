"""CUDA graphs for decode batches (one query token per sequence).

One graph per batch size in `batch_sizes`, captured largest first into a shared memory pool; all
graphs read static input buffers and write one static hidden-state buffer. A decode batch of n
sequences replays the smallest graph of size >= n; the padded rows are dummy sequences of length 1
whose KV goes to the reserved null block 0.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from infergrid.worker import envs
from infergrid.worker.engine.block_pool import NULL_BLOCK_ID
from infergrid.worker.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from infergrid.worker.engine.model_runner import ModelRunner, _BatchInputs

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to and including max_batch_size."""
    sizes = {b for b in (1, 2, 4, 8) if b <= max_batch_size} | set(range(16, max_batch_size + 1, 16))
    sizes.add(max_batch_size)
    return sorted(sizes)


class CUDAGraphRunner:
    """Captures and replays the model's forward pass for decode batches."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        limit = envs.cuda_graph_max_batch_size() or 512
        self.max_batch_size = min(runner.config.max_num_seqs, limit)
        self.batch_sizes = graph_batch_sizes(self.max_batch_size)
        dev, n = runner.device, self.max_batch_size
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), NULL_BLOCK_ID * runner.block_size, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((n, runner.max_blocks_per_seq), NULL_BLOCK_ID, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros(n, runner.model_config.hidden_size, dtype=runner.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_replays = 0

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_seq_len=self.runner.max_model_len,
            block_size=self.runner.block_size,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        model = self.runner.model
        start = time.monotonic()
        pool = None
        for bs in reversed(self.batch_sizes):
            meta = self._meta(bs)
            self.hidden[:bs] = model(self.input_ids[:bs], self.positions[:bs], meta)  # warm-up / compile
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[:bs] = model(self.input_ids[:bs], self.positions[:bs], meta)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (decode batch sizes %s) in %.1f s",
                    len(self.graphs), self.batch_sizes, time.monotonic() - start)

    def can_run(self, batch: _BatchInputs) -> bool:
        return batch.meta.num_seqs <= self.max_batch_size

    def run(self, batch: _BatchInputs) -> torch.Tensor:
        """Replay the graph for a uniform decode batch; returns hidden states [n, hidden]."""
        n = batch.meta.num_seqs
        bs = next(b for b in self.batch_sizes if b >= n)
        width = batch.meta.block_tables.shape[1]
        self.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(batch.meta.slot_mapping, non_blocking=True)
        self.slot_mapping[n:bs].fill_(NULL_BLOCK_ID * self.runner.block_size)
        self.seq_lens[:n].copy_(batch.meta.seq_lens, non_blocking=True)
        self.seq_lens[n:bs].fill_(1)
        self.block_tables[:n, :width].copy_(batch.meta.block_tables, non_blocking=True)
        self.block_tables[n:bs, 0].fill_(NULL_BLOCK_ID)
        self.graphs[bs].replay()
        self.num_replays += 1
        return self.hidden[:n]
