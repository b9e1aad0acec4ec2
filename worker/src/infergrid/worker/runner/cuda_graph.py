"""CUDA graphs: one capture/replay machinery (GraphSet) and the runner's forward-pass graphs.

    GraphSet          graphs keyed by an int, captured largest first into the runner's memory pool
                      (`GraphPool`, shared by every graph set of one runner), replayed by key,
                      released before NCCL teardown and at exit. Subclasses say what a graph runs.
    CUDAGraphRunner   the model's forward pass for batches of up to `max_query_len` query tokens per
                      sequence, keyed by (batch-size bucket, token capacity). Decode is the case
                      max_query_len 1 (one capacity per bucket: the bucket); verification of k drafts
                      is max_query_len 1 + k. The draft model's own graphs (spec_decode/
                      draft_loop_graph.py, ahead_graph.py) are GraphSets of the draft's runner.

A forward graph reads static input buffers, staged by one kernel per step (graph_inputs.py), and
writes one static hidden-state buffer:

    tokens:  [ seq 0: 1+k | seq 1: 1 | seq 2: 1+j | ... | padding tokens -> null block 0 ]
    seqs:    real sequences, then dummies: with max_query_len 1 a dummy is a sequence of length 1
             reading the null block (its table row's column 0); else it has 0 query tokens and
             seq_len 0 (the paged attention kernel does nothing for it). Padding outputs are never read.

Each batch bucket has several token capacities, from a quarter more tokens than sequences up to
bucket * max_query_len, so a step where a few requests of a large batch verify drafts costs about its
real tokens. The attention grid is fixed at capture (query tiles for max_query_len), which is why the
number of query tokens per sequence is bounded, not the layout.

Tensor parallel: the graphs hold NCCL all-reduces. Every rank captures the same graphs in the same
order (rank 0's GraphPlan) and replays the one rank 0 names in the step header. NCCL >= 2.26 will not
destroy (nor abort) a communicator while a graph that captured one of its collectives is alive, so
graphs are released (`release`) before the process group is left, and at interpreter exit.

Without CUDA, INFERGRID_EMULATE_CUDA_GRAPHS=1 (tests) runs this code path with `EagerGraph` stand-ins:
"capture" runs the forward once more (issuing the collectives a real capture records), "replay"
runs it again on the static buffers, which is what a replay computes.
"""

from __future__ import annotations

import atexit
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch

from infergrid.worker.distributed import debug
from infergrid.worker.engine.block_pool import NULL_BLOCK_ID
from infergrid.worker.layers.attention import AttentionMetadata
from infergrid.worker.runner.graph_inputs import GraphInputs, stage_graph_inputs
from infergrid.worker.runner.input_batch import BatchInputs

logger = logging.getLogger(__name__)

MAX_GRAPH_BATCH_SIZE = 512  # larger decode batches run eagerly (their launch gaps are a small share)


class GraphTarget(Protocol):
    """What a graph set reads from the runner whose model it captures (ModelRunner has all of it)."""

    device: torch.device
    dtype: torch.dtype
    block_size: int
    max_model_len: int
    max_blocks_per_seq: int
    model: Any  # the model (forward(input_ids, positions, meta), lm_head)
    backend: Any  # the attention backend (prepare(meta))
    model_config: Any  # .hidden_size
    config: Any  # .max_num_seqs


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to and including max_batch_size."""
    sizes = {b for b in (1, 2, 4, 8) if b <= max_batch_size} | set(range(16, max_batch_size + 1, 16))
    sizes.add(max_batch_size)
    return sorted(sizes)


def default_max_batch_size(max_num_seqs: int) -> int:
    """Largest batch captured: max_num_seqs, at most MAX_GRAPH_BATCH_SIZE."""
    return min(max_num_seqs, MAX_GRAPH_BATCH_SIZE)


def pack_key(batch_size: int, capacity: int) -> int:
    """One int (GraphSet key, StepHeader.graph_key) for a (batch bucket, token capacity) graph."""
    return batch_size << 20 | capacity


def unpack_key(key: int) -> tuple[int, int]:
    return key >> 20, key & ((1 << 20) - 1)


def token_capacities(batch_size: int, max_query_len: int) -> list[int]:
    """Token capacities captured for one batch bucket: batch_size * (1 + f) for f in 1/4, 1/2, 1,
    2, ... up to batch_size * max_query_len (ascending, distinct; [batch_size] for max_query_len 1)."""
    top = batch_size * max_query_len
    fractions = [0.25, 0.5, *range(1, max_query_len)]
    return sorted({min(top, batch_size + max(1, -(-int(batch_size * 4 * f) // 4))) for f in fractions} | {top})


class EagerGraph:
    """Stand-in for torch.cuda.CUDAGraph without CUDA: replay re-runs the captured function."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn

    def replay(self) -> None:
        if self._fn is None:
            raise RuntimeError("replay of a released graph")
        self._fn()

    def reset(self) -> None:
        self._fn = None


class GraphPool:
    """The CUDA memory pool one runner's graphs are captured into (a graph's temporaries; its inputs and
    outputs are static buffers allocated outside). Graphs of one pool must not run concurrently: they
    replay one at a time on the runner's stream."""

    def __init__(self) -> None:
        self.handle: Any = None  # set by the first capture


# Every graph set alive in this process (released at exit, before NCCL's communicators are destroyed).
_LIVE: weakref.WeakSet[GraphSet] = weakref.WeakSet()


class GraphSet:
    """A runner's graphs of one kind, keyed by an int (`keys`), for batches of up to `max_batch_size`
    sequences (buckets `batch_sizes`). A subclass says what one graph runs (`make_forward`) and stages
    its static inputs before `replay`; `capture` captures every key, `release` destroys them."""

    kind = "graphs"

    def __init__(self, runner: GraphTarget, max_batch_size: int | None = None, pool: GraphPool | None = None) -> None:
        self.runner = runner
        self.max_batch_size = max_batch_size or default_max_batch_size(runner.config.max_num_seqs)
        self.batch_sizes = graph_batch_sizes(self.max_batch_size)
        self.keys: list[int] = list(self.batch_sizes)
        self.pool = pool if pool is not None else GraphPool()
        self.graphs: dict[int, Any] = {}
        self.num_replays = 0
        _LIVE.add(self)

    def make_forward(self, key: int) -> Callable[[], None]:
        """The capturable function of graph `key` (reads and writes only static buffers)."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.kind} (batch sizes {self.batch_sizes})"

    @torch.inference_mode()
    def capture(self) -> None:
        """Per key, last (the largest graph) first: a warm-up run (compiles kernels, sets up NCCL
        connections eagerly), then the capture into the runner's pool (on CPU: one more eager run)."""
        start = time.monotonic()
        device = self.runner.device
        for key in reversed(self.keys):
            forward = self.make_forward(key)
            forward()
            if device.type == "cuda":
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool.handle):
                    forward()
                self.pool.handle = graph.pool()
            else:
                forward()
                graph = EagerGraph(forward)
            self.graphs[key] = graph
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        logger.info("captured %d CUDA graphs of %s in %.1f s", len(self.graphs), self.describe(),
                    time.monotonic() - start)

    def replay(self, key: int) -> None:
        graph = self.graphs.get(key)
        if graph is None:
            raise RuntimeError(f"no {self.kind} CUDA graph with key {key} on this rank "
                               f"(captured: {sorted(self.graphs)}); the ranks' graph plans differ")
        debug.record(f"replay:{self.kind}:{key}")
        graph.replay()
        self.num_replays += 1

    def bucket_size(self, num_seqs: int) -> int | None:
        """The smallest captured batch size >= num_seqs (None: too large)."""
        return next((b for b in self.batch_sizes if b >= num_seqs), None)

    def release(self) -> None:
        """Destroy the graphs (idempotent); the runner falls back to eager afterwards."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()


def num_live_graphs() -> int:
    """CUDA graphs (or stand-ins) alive in this process."""
    return sum(len(s.graphs) for s in list(_LIVE))


@atexit.register
def release_all_graphs() -> None:
    """Release every graph in this process (at exit: before NCCL communicators are torn down)."""
    for graph_set in list(_LIVE):
        graph_set.release()


def decode_metadata(runner: GraphTarget, slot_mapping: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor) -> AttentionMetadata:
    """Attention metadata of a captured decode pass (one query token per sequence) over static
    buffers; the kernels' grid is sized for the runner's max_model_len."""
    return AttentionMetadata(
        slot_mapping=slot_mapping, query_start_loc=query_start_loc, seq_lens=seq_lens,
        block_tables=block_tables, max_query_len=1, max_seq_len=runner.max_model_len,
        block_size=runner.block_size,
    )


class CUDAGraphRunner(GraphSet):
    """Captures and replays the model's forward pass for batches of up to `max_query_len` query tokens
    per sequence (1: decode batches), keyed by pack_key(batch bucket, token capacity)."""

    def __init__(self, runner: GraphTarget, max_query_len: int, max_batch_size: int | None = None,
                 pool: GraphPool | None = None) -> None:
        if max_query_len < 1:
            raise ValueError(f"max_query_len must be >= 1, got {max_query_len}")
        super().__init__(runner, max_batch_size, pool)
        self.max_query_len = q = max_query_len
        self.kind = "decode" if q == 1 else "multi_token"
        self.capacities = {bs: token_capacities(bs, q) for bs in self.batch_sizes}
        self.keys = [pack_key(bs, t) for bs in self.batch_sizes for t in self.capacities[bs]]
        dev, n = runner.device, self.max_batch_size
        self.input_ids = torch.zeros(n * q, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n * q, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n * q,), NULL_BLOCK_ID * runner.block_size, dtype=torch.int64, device=dev)
        self.seq_lens = torch.full((n,), q, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev) * q
        self.block_tables = torch.full((n, runner.max_blocks_per_seq), NULL_BLOCK_ID, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros(n * q, runner.model_config.hidden_size, dtype=runner.dtype, device=dev)
        # Decode graphs keep their query starts (0, 1, 2, ...) and pad with length-1 dummies.
        self.inputs = GraphInputs(self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.block_tables,
                                  self.query_start_loc if q > 1 else None)

    def describe(self) -> str:
        if self.max_query_len == 1:
            return f"decode batches (batch sizes {self.batch_sizes})"
        return (f"up to {self.max_query_len} query tokens per sequence (batch sizes {self.batch_sizes}, "
                "several token capacities each)")

    def make_forward(self, key: int) -> Callable[[], None]:
        model, backend = self.runner.model, self.runner.backend
        bs, t = unpack_key(key)
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:t],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=self.max_query_len,
            max_seq_len=self.runner.max_model_len,
            block_size=self.runner.block_size,
        )
        if self.max_query_len > 1:
            # Capture-time layout that fits the capacity: full sequences first, then empty ones (a layout
            # of bs * max_query_len tokens would read past the t tokens this graph computes).
            q = self.max_query_len
            q_lens = (t - torch.arange(bs, device=self.seq_lens.device) * q).clamp(0, q)
            self.seq_lens[:bs] = q_lens.to(self.seq_lens.dtype)
            self.query_start_loc[0] = 0
            self.query_start_loc[1 : bs + 1] = torch.cumsum(q_lens, 0).to(self.query_start_loc.dtype)

        def forward() -> None:
            backend.prepare(meta)  # no device work for the triton backend (capturable)
            self.hidden[:t] = model(self.input_ids[:t], self.positions[:t], meta)

        return forward

    def bucket(self, num_seqs: int, num_tokens: int, max_query_len: int, num_block_columns: int) -> int | None:
        """Key of the smallest graph that serves such a batch (None: none does)."""
        if (not self.graphs or max_query_len > self.max_query_len
                or num_block_columns > self.block_tables.shape[1]):
            return None
        bs = self.bucket_size(num_seqs)
        if bs is None:
            return None
        return pack_key(bs, next(t for t in self.capacities[bs] if t >= num_tokens))

    def run(self, batch: BatchInputs, key: int | None = None) -> torch.Tensor:
        """Replay the graph of `key` (default: the smallest that holds the batch); returns hidden
        states [T, hidden]."""
        meta = batch.meta
        n, t = meta.num_seqs, batch.input_ids.shape[0]
        if key is None:
            key = self.bucket(n, t, meta.max_query_len, meta.block_tables.shape[1])
            assert key is not None, f"no {self.kind} graph holds this batch"
        bs, capacity = unpack_key(key)
        is_decode = self.max_query_len == 1
        stage_graph_inputs(
            self.inputs, input_ids=batch.input_ids, positions=batch.positions, slot_mapping=meta.slot_mapping,
            seq_lens=meta.seq_lens, block_tables=meta.block_tables,
            query_start_loc=None if is_decode else meta.query_start_loc, token_end=capacity, batch_size=bs,
            seq_pad=1 if is_decode else 0, null_slot=NULL_BLOCK_ID * self.runner.block_size,
            pad_table_rows=is_decode,
        )
        self.replay(key)
        return self.hidden[:t]
