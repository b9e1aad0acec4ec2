"""CUDA graphs for verification batches: every sequence has 1 .. max_query_len query tokens.

A speculating request feeds 1 + k tokens per step, so its steps are not decode batches and would
miss the decode CUDA graphs (engine/cuda_graph.py). These graphs are keyed by (batch-size bucket,
token capacity) and serve any batch whose sequences each have at most max_query_len query tokens
(mixed draft lengths, short prefill chunks), with at most `capacity` tokens in all:

    tokens:  [ seq 0: 1+k | seq 1: 1 | seq 2: 1+j | ... | padding tokens -> null block 0 ]
    seqs:    real sequences, then dummies with 0 query tokens and seq_len 0 (the paged attention
             kernel does nothing for them); padding tokens' outputs are garbage and never read.

Each batch bucket has several capacities, from a quarter more tokens than sequences up to
bucket * max_query_len, so a step where a few requests of a large batch verify drafts costs about
its real tokens, not a full bucket * max_query_len (the cost model of adaptive k assumes that a
draft token costs about one token of compute). The attention grid is fixed at capture (query tiles
for max_query_len), which is why the number of query tokens per sequence is bounded, not the
layout. Capture, replay and release go through engine/cuda_graph.py's GraphSet (same order on
every tensor-parallel rank, released before NCCL teardown); the key packs (bucket, capacity).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from infergrid.worker.engine.block_pool import NULL_BLOCK_ID
from infergrid.worker.engine.cuda_graph import GraphSet
from infergrid.worker.engine.graph_inputs import GraphInputs, stage_graph_inputs
from infergrid.worker.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from infergrid.worker.engine.model_runner import ModelRunner, _BatchInputs

logger = logging.getLogger(__name__)


def pack_key(batch_size: int, capacity: int) -> int:
    """One int (GraphSet key, StepHeader.graph_key) for a (batch bucket, token capacity) graph."""
    return batch_size << 20 | capacity


def unpack_key(key: int) -> tuple[int, int]:
    return key >> 20, key & ((1 << 20) - 1)


def token_capacities(batch_size: int, max_query_len: int) -> list[int]:
    """Token capacities captured for one batch bucket: batch_size * (1 + f) for f in 1/4, 1/2, 1,
    2, ... up to batch_size * max_query_len (ascending, distinct)."""
    top = batch_size * max_query_len
    fractions = [0.25, 0.5, *range(1, max_query_len)]
    return sorted({min(top, batch_size + max(1, -(-int(batch_size * 4 * f) // 4))) for f in fractions} | {top})


class MultiTokenCUDAGraphRunner(GraphSet):
    """Captures and replays a runner's forward pass for batches of up to max_query_len tokens per sequence."""

    kind = "multi_token"

    def __init__(self, runner: ModelRunner, max_query_len: int, max_batch_size: int | None = None) -> None:
        if max_query_len < 2:
            raise ValueError(f"max_query_len must be >= 2 (decode batches have their own graphs), got {max_query_len}")
        super().__init__(runner, max_batch_size)
        self.max_query_len = q = max_query_len
        self.keys = [pack_key(bs, t) for bs in self.batch_sizes for t in token_capacities(bs, max_query_len)]
        dev, n = runner.device, self.max_batch_size
        self.input_ids = torch.zeros(n * q, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n * q, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n * q,), NULL_BLOCK_ID * runner.block_size, dtype=torch.int64, device=dev)
        self.seq_lens = torch.full((n,), q, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev) * q
        self.block_tables = torch.full((n, runner.max_blocks_per_seq), NULL_BLOCK_ID, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros(n * q, runner.model_config.hidden_size, dtype=runner.dtype, device=dev)
        self.inputs = GraphInputs(self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.block_tables,
                                  self.query_start_loc)

    def _meta(self, bs: int, capacity: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:capacity],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=self.max_query_len,
            max_seq_len=self.runner.max_model_len,
            block_size=self.runner.block_size,
        )

    def _make_forward(self, key: int) -> Callable[[], None]:
        model, backend = self.runner.model, self.runner.backend
        bs, t = unpack_key(key)
        meta = self._meta(bs, t)
        # Capture-time layout that fits the capacity: full sequences first, then empty ones (a layout of
        # bs * max_query_len tokens would read past the t tokens this graph computes).
        q_lens = (t - torch.arange(bs, device=self.seq_lens.device) * self.max_query_len).clamp(0, self.max_query_len)
        self.seq_lens[:bs] = q_lens.to(self.seq_lens.dtype)
        self.query_start_loc[0] = 0
        self.query_start_loc[1 : bs + 1] = torch.cumsum(q_lens, 0).to(self.query_start_loc.dtype)

        def forward() -> None:
            backend.prepare(meta)  # no device work for the triton backend (capturable)
            self.hidden[:t] = model(self.input_ids[:t], self.positions[:t], meta)

        return forward

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.monotonic()
        self.capture_all(self.runner.device, self.keys, self._make_forward)
        logger.info("captured %d CUDA graphs for up to %d query tokens per sequence (batch sizes %s, several "
                    "token capacities each) in %.1f s", len(self.graphs), self.max_query_len, self.batch_sizes,
                    time.monotonic() - start)

    def bucket(self, num_seqs: int, num_tokens: int, max_query_len: int, num_block_columns: int) -> int | None:
        """Key of the smallest graph that serves such a batch (None: none does)."""
        if (not self.graphs or max_query_len > self.max_query_len
                or num_block_columns > self.block_tables.shape[1]):
            return None
        bs = next((b for b in self.batch_sizes if b >= num_seqs), None)
        if bs is None:
            return None
        return pack_key(bs, next(t for t in token_capacities(bs, self.max_query_len) if t >= num_tokens))

    def run(self, batch: _BatchInputs, key: int | None = None) -> torch.Tensor:
        """Replay the graph of `key` (default: the smallest that holds the batch); returns hidden [T, hidden]."""
        meta = batch.meta
        n, t = meta.num_seqs, batch.input_ids.shape[0]
        if key is None:
            key = self.bucket(n, t, meta.max_query_len, meta.block_tables.shape[1])
            assert key is not None, "no multi-token graph holds this batch"
        bs, cap = unpack_key(key)
        stage_graph_inputs(
            self.inputs, input_ids=batch.input_ids, positions=batch.positions, slot_mapping=meta.slot_mapping,
            seq_lens=meta.seq_lens, block_tables=meta.block_tables, query_start_loc=meta.query_start_loc,
            token_end=cap, batch_size=bs, seq_pad=0, null_slot=NULL_BLOCK_ID * self.runner.block_size,
            pad_table_rows=False,
        )
        self.replay(key)
        return self.hidden[:t]
