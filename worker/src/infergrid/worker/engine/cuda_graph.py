"""CUDA graphs for decode batches (one query token per sequence).

One graph per batch size in `batch_sizes`, captured largest first into a shared memory pool; all
graphs read static input buffers and write one static hidden-state buffer. A decode batch of n
sequences replays the smallest graph of size >= n; the padded rows are dummy sequences of length 1
whose KV goes to the reserved null block 0.

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
from typing import TYPE_CHECKING, Any

import torch

from infergrid.worker import envs
from infergrid.worker.distributed import debug
from infergrid.worker.engine.block_pool import NULL_BLOCK_ID
from infergrid.worker.engine.graph_inputs import GraphInputs, stage_graph_inputs
from infergrid.worker.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from infergrid.worker.engine.model_runner import ModelRunner, _BatchInputs

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to and including max_batch_size."""
    sizes = {b for b in (1, 2, 4, 8) if b <= max_batch_size} | set(range(16, max_batch_size + 1, 16))
    sizes.add(max_batch_size)
    return sorted(sizes)


def default_max_batch_size(max_num_seqs: int) -> int:
    """Largest batch captured: max_num_seqs, capped by INFERGRID_CUDA_GRAPH_MAX_BS (default 512)."""
    return min(max_num_seqs, envs.cuda_graph_max_batch_size() or 512)


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


# Every graph set alive in this process (released at exit, before NCCL's communicators are destroyed).
_LIVE: weakref.WeakSet[GraphSet] = weakref.WeakSet()


class GraphSet:
    """A runner's graphs keyed by an int (a padded batch size, or a subclass's packed key), captured
    with `capture_all` for batches of up to `max_batch_size` sequences (buckets `batch_sizes`);
    `release` destroys them."""

    kind = "graphs"

    def __init__(self, runner: ModelRunner, max_batch_size: int | None = None) -> None:
        self.runner = runner
        self.max_batch_size = max_batch_size or default_max_batch_size(runner.config.max_num_seqs)
        self.batch_sizes = graph_batch_sizes(self.max_batch_size)
        self.graphs: dict[int, Any] = {}
        self.num_replays = 0
        _LIVE.add(self)

    def capture_all(self, device: torch.device, keys: list[int],
                    make_forward: Callable[[int], Callable[[], None]]) -> None:
        """Per key, last (the largest graph) first: a warm-up run (compiles kernels, sets up NCCL
        connections eagerly), then the capture into the shared pool (on CPU: one more eager run)."""
        pool = None
        for key in reversed(keys):
            forward = make_forward(key)
            forward()
            if device.type == "cuda":
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    forward()
                pool = graph.pool()
            else:
                forward()
                graph = EagerGraph(forward)
            self.graphs[key] = graph
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def replay(self, key: int) -> None:
        graph = self.graphs.get(key)
        if graph is None:
            raise RuntimeError(f"no {self.kind} CUDA graph with key {key} on this rank "
                               f"(captured: {sorted(self.graphs)}); the ranks' graph plans differ")
        debug.record(f"replay:{self.kind}:{key}")
        graph.replay()
        self.num_replays += 1

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


def decode_metadata(runner: ModelRunner, slot_mapping: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor) -> AttentionMetadata:
    """Attention metadata of a captured decode pass (one query token per sequence) over static
    buffers; the kernels' grid is sized for the runner's max_model_len."""
    return AttentionMetadata(
        slot_mapping=slot_mapping, query_start_loc=query_start_loc, seq_lens=seq_lens,
        block_tables=block_tables, max_query_len=1, max_seq_len=runner.max_model_len,
        block_size=runner.block_size,
    )


class CUDAGraphRunner(GraphSet):
    """Captures and replays the model's forward pass for decode batches."""

    kind = "decode"

    def __init__(self, runner: ModelRunner, max_batch_size: int | None = None) -> None:
        super().__init__(runner, max_batch_size)
        dev, n = runner.device, self.max_batch_size
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), NULL_BLOCK_ID * runner.block_size, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((n, runner.max_blocks_per_seq), NULL_BLOCK_ID, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros(n, runner.model_config.hidden_size, dtype=runner.dtype, device=dev)
        self.inputs = GraphInputs(self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.block_tables)

    def _make_forward(self, bs: int) -> Callable[[], None]:
        model, backend = self.runner.model, self.runner.backend
        meta = decode_metadata(self.runner, self.slot_mapping[:bs], self.query_start_loc[: bs + 1],
                               self.seq_lens[:bs], self.block_tables[:bs])

        def forward() -> None:
            backend.prepare(meta)  # no device work for the triton backend (capturable)
            self.hidden[:bs] = model(self.input_ids[:bs], self.positions[:bs], meta)

        return forward

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.monotonic()
        self.capture_all(self.runner.device, self.batch_sizes, self._make_forward)
        logger.info("captured %d CUDA graphs (decode batch sizes %s) in %.1f s",
                    len(self.graphs), self.batch_sizes, time.monotonic() - start)

    def bucket(self, num_seqs: int) -> int | None:
        """Batch size of the graph a decode batch of `num_seqs` replays (None: too large)."""
        if not self.graphs:
            return None
        return next((b for b in self.batch_sizes if b >= num_seqs), None)

    def run(self, batch: _BatchInputs, bs: int | None = None) -> torch.Tensor:
        """Replay the graph of `bs` (default: the smallest that fits) for a uniform decode batch;
        returns hidden states [n, hidden]."""
        meta = batch.meta
        n = meta.num_seqs
        bs = bs or next(b for b in self.batch_sizes if b >= n)
        stage_graph_inputs(
            self.inputs, input_ids=batch.input_ids, positions=batch.positions, slot_mapping=meta.slot_mapping,
            seq_lens=meta.seq_lens, block_tables=meta.block_tables, query_start_loc=None, token_end=bs,
            batch_size=bs, seq_pad=1, null_slot=NULL_BLOCK_ID * self.runner.block_size, pad_table_rows=True,
        )
        self.replay(bs)
        return self.hidden[:n]
