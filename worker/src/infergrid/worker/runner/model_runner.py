"""ModelRunner: one model on one device; a step is prepare_inputs -> forward -> sample.

Where it sits (a newcomer's map of the worker):

    engine/         LLMEngine's loop: schedule -> execute -> update -> drafts, and its core (Scheduler,
                    KVCacheManager, BlockPool): pure Python, no tensors
    distributed/    executors (one process, or N tensor-parallel ranks) and the TP step protocol;
                    the executor builds the runner and, on rank 0, its speculator
    runner/         this package: a step's tensors (input_batch.py), its sampling metadata
                    (sampling_metadata.py), its output (runner_output.py), the KV pool's size (kv_cache.py),
                    the CUDA graphs (cuda_graph.py), and the speculator hooks it calls (speculator.py)
    sample/         logits -> tokens: sampler, rejection sampler, argmax
    spec_decode/    proposers (n-gram, draft model on a ModelRunner of its own) and the verifier's
                    bookkeeping; imports the runner, never the other way round

The runner owns the model, the paged KV cache, the sampler, per-request seeded generators and the
CUDA graphs (one CUDAGraphRunner per query length: 1 for decode, 1 + k for verification). Requests
with draft tokens sample at every draft position plus one and are verified by rejection sampling
(the speculator's `verify`, sample/rejection_sampler.py), which keeps the target distribution
exactly; a request keeps its tokens up to and including the first rejected position. Constrained
requests (structured output) get their grammar bitmask filled on the host after the forward pass is
launched, so it overlaps the device's work.

Public API, also what a draft model's proposer uses on its own runner: `initialize_kv_cache` (with a
given number of blocks and graph plan), `add_graphs` (a GraphSet captured into this runner's pool),
`prepare_inputs`, `decode_batch`, `forward`, `compute_logits`, `upload` / `upload_arrays` / `to_device`.

Tensor parallel: every rank has a ModelRunner over its shard. Rank 0's `execute_model` hands the
step's flat inputs to `step_broadcaster` (set by the MultiProcExecutor) before its forward pass; the
other ranks run the same forward in `follow_step` and join the logits gather, and only rank 0 samples.
NOTE: every choice that changes a step's collectives is rank 0's and travels in the step header (the
step id, the CUDA graph and its padded batch size); the graphs captured are rank 0's GraphPlan.

Async scheduling: `execute_model` only launches the step (runner_output.py); an input token the previous
step is still sampling is filled in on the device (input_batch.py), on every rank (rank 0 broadcasts).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

from infergrid.worker import envs
from infergrid.worker.config import EngineConfig
from infergrid.worker.distributed import debug
from infergrid.worker.distributed.communication import (
    tensor_parallel_barrier,
    tensor_parallel_broadcast,
    tensor_parallel_min,
)
from infergrid.worker.distributed.messages import GraphKind, GraphPlan, StepHeader
from infergrid.worker.distributed.parallel_state import kv_head_layout
from infergrid.worker.engine.scheduler_output import ScheduledRequest, SchedulerOutput
from infergrid.worker.layers.attention import AttentionMetadata
from infergrid.worker.layers.attention_backends import get_attention_backend
from infergrid.worker.layers.fp8_lm_head import Fp8LMHead
from infergrid.worker.loader import load_model, resolve_dtype
from infergrid.worker.model_config import ModelConfig
from infergrid.worker.runner.cuda_graph import CUDAGraphRunner, GraphPool, GraphSet, default_max_batch_size
from infergrid.worker.runner.host_staging import PinnedStaging
from infergrid.worker.runner.input_batch import (
    BatchInputs,
    batch_from_flat,
    concat_int64,
    flatten_step,
    logits_rows,
)
from infergrid.worker.runner.kv_cache import determine_num_blocks, profile_forward
from infergrid.worker.runner.runner_output import PendingRunnerOutput
from infergrid.worker.runner.sampling_metadata import SamplingMetadataBuilder, sample_rows
from infergrid.worker.runner.speculator import Speculator
from infergrid.worker.sample.sampler import Sampler
from infergrid.worker.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)

G = TypeVar("G", bound=GraphSet)


def resolve_device(device: str | None, rank: int = 0) -> torch.device:
    """None -> cuda when available, else cpu; tensor-parallel rank r gets the r-th GPU from there."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", (torch.cuda.current_device() if dev.index is None else dev.index) + rank)
    return dev


class ModelRunner:
    """Runs one model on one device for the engine (see the module docstring).

    Args:
        config: the engine's config (a draft model's runner gets a copy for its checkpoint).
        model_dir, model_config: the checkpoint.
        max_model_len: the longest sequence (KV blocks per sequence, graph grids).
        eos_token_ids: banned below a request's min_tokens.
        rank: the tensor-parallel rank (config.tensor_parallel_size ranks).
        lm_head_dtype: None, or "fp8" for an FP8 LM head (layers/fp8_lm_head.py; a draft model's).
    """

    def __init__(
        self,
        config: EngineConfig,
        model_dir: str,
        model_config: ModelConfig,
        max_model_len: int,
        eos_token_ids: list[int],
        rank: int = 0,
        lm_head_dtype: str | None = None,
    ) -> None:
        self.config = config
        self.rank, self.tp_size = rank, config.tensor_parallel_size
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.block_size = config.block_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = resolve_device(config.device, rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(config.dtype, model_config)
        torch.manual_seed(config.seed)
        self.backend = get_attention_backend(self.device)
        self.model = load_model(model_dir, model_config, self.dtype, self.device, max_model_len, self.backend,
                                tp_rank=rank, tp_size=self.tp_size)
        if lm_head_dtype == "fp8":  # (before any CUDA graph is captured)
            self.model.lm_head = Fp8LMHead(self.model.lm_head.weight)
        self.num_kv_heads = kv_head_layout(model_config.num_key_value_heads, self.tp_size)[0]  # on this rank
        # Rank 0 of several: called with each step's header and flat inputs before the forward pass.
        self.step_broadcaster: Callable[[StepHeader, np.ndarray], None] | None = None
        self.sampler = Sampler()
        self.vocab_size = model_config.vocab_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.kv_cache: torch.Tensor | None = None
        self.num_blocks = 0
        # CUDA graphs, when captured: the forward pass of decode and of verification batches, and any
        # other graph set added (a draft model's), all in one memory pool.
        self.graph_pool = GraphPool()
        self.decode_graphs: CUDAGraphRunner | None = None
        self.multi_token_graphs: CUDAGraphRunner | None = None
        self.graph_sets: list[GraphSet] = []
        self.num_steps = 0  # steps prepared (rank 0) or followed (other ranks); the step id is the count
        # Async scheduling: the last step's sampled tokens on the device (on every rank) and, on rank 0,
        # each request's row in them (where its placeholder input token comes from).
        self.is_async = config.async_scheduling
        self._prev_sampled: torch.Tensor | None = None
        self._staging = PinnedStaging(self.device) if self.device.type == "cuda" else None
        self._prev_rows: dict[str, int] = {}
        self.sampling = SamplingMetadataBuilder(self.device, self.vocab_size, self.eos_token_ids, self.to_device)
        # Set from outside, on the rank that samples: speculative decoding (by the executor) and
        # structured output (by the engine: grammar matchers that fill each step's bitmask).
        self.speculator: Speculator | None = None
        self.structured_output: StructuredOutputManager | None = None

    # -- KV cache and CUDA graphs ------------------------------------------------------------------
    def graph_plan(self, max_query_len: int | None = None) -> GraphPlan:
        """The CUDA graphs this runner would capture (rank 0's plan is every rank's): decode graphs,
        and graphs of up to `max_query_len` tokens per sequence (default: 1 + num_speculative_tokens
        when speculating, else none)."""
        can_capture = ((self.device.type == "cuda" and self.backend.name == "triton")
                       or (self.device.type == "cpu" and envs.emulate_cuda_graphs()))
        if self.config.enforce_eager or not can_capture:
            return GraphPlan()
        k = self.config.num_speculative_tokens
        if max_query_len is None:
            max_query_len = 1 + k if k > 0 else 0
        max_bs = default_max_batch_size(self.config.max_num_seqs)
        return GraphPlan(max_bs, max_bs if max_query_len > 1 else 0, max_query_len if max_query_len > 1 else 0)

    def initialize_kv_cache(self, plan: GraphPlan | None = None, num_blocks: int | None = None,
                            extra_block_bytes: int = 0) -> int:
        """Size (profiling on CUDA; `num_blocks` when given, else config.num_gpu_blocks_override when
        set), allocate and bind the KV cache; capture the CUDA graphs of `plan` (default: `graph_plan()`).
        `extra_block_bytes`: what each block id costs elsewhere (a draft model's pool mirrors this
        one's ids). Returns the number of blocks (null block included)."""
        plan = self.graph_plan() if plan is None else plan
        is_tp = self.tp_size > 1  # (a tp_size-1 runner in a TP process, e.g. a draft model, issues no collective)
        try:
            num_blocks = determine_num_blocks(
                device=self.device,
                model_config=dataclasses.replace(self.model_config, num_key_value_heads=self.num_kv_heads),
                dtype=self.dtype,
                block_size=self.block_size,
                max_num_seqs=self.config.max_num_seqs,
                max_model_len=self.max_model_len,
                gpu_memory_utilization=self.config.gpu_memory_utilization,
                num_blocks_override=num_blocks if num_blocks is not None else self.config.num_gpu_blocks_override,
                profile_run=self.profile_run,
                extra_block_bytes=extra_block_bytes,
            )
            error: ValueError | None = None
        except ValueError as exc:  # too little memory: the other ranks must not wait for this one
            if not is_tp:
                raise
            num_blocks, error = -1, exc
        if is_tp:  # every rank holds every block
            num_blocks = tensor_parallel_min(num_blocks, self.device)
            if num_blocks < 0:
                raise error or RuntimeError("another tensor-parallel rank could not size its KV cache (see its log)")
        self.num_blocks = num_blocks
        cfg = self.model_config
        shape = (2, cfg.num_hidden_layers, self.num_blocks, self.block_size, self.num_kv_heads, cfg.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        if plan.has_graphs:
            self._capture_graphs(plan)
        if is_tp:
            debug.check(0, "after INIT_KV_CACHE")
        return self.num_blocks

    def _capture_graphs(self, plan: GraphPlan) -> None:
        # Every rank enters the captures with no collective in flight and leaves them together.
        if self.tp_size > 1:
            tensor_parallel_barrier(self.device)
        if plan.decode_max_batch_size:
            self.decode_graphs = self.add_graphs(
                CUDAGraphRunner(self, 1, plan.decode_max_batch_size, self.graph_pool))
        if plan.multi_token_max_query_len:
            self.multi_token_graphs = self.add_graphs(CUDAGraphRunner(
                self, plan.multi_token_max_query_len, plan.multi_token_max_batch_size, self.graph_pool))
        if self.tp_size > 1:
            tensor_parallel_barrier(self.device)

    def add_graphs(self, graphs: G) -> G:
        """Capture a graph set of this runner's model (built with `graph_pool`); it is released with
        the runner's graphs. Returns it."""
        graphs.capture()
        self.graph_sets.append(graphs)
        return graphs

    def release_cuda_graphs(self) -> None:
        """Destroy this runner's CUDA graphs (idempotent); later steps run eagerly.

        NOTE: call it on every rank before leaving an NCCL group: NCCL (>= 2.26) destroys or aborts
        a communicator only once every graph that captured one of its collectives is gone."""
        for graphs in self.graph_sets:
            graphs.release()
        self.graph_sets = []
        self.decode_graphs = self.multi_token_graphs = None

    @torch.inference_mode()
    def profile_run(self) -> None:
        """A forward pass at the largest batch the scheduler can form (no KV cache yet) plus sampling."""
        budget = min(self.config.get_max_num_batched_tokens(), self.config.max_num_seqs * self.max_model_len)
        profile_forward(self.model, self.backend, self.sampler, self.device, budget, self.max_model_len,
                        self.config.max_num_seqs, self.block_size)

    # -- one step ----------------------------------------------------------------------------------
    def remove_requests(self, request_ids: set[str]) -> None:
        """Forget per-request state (seeded generators, grammars, drafts) of finished requests."""
        self.sampling.remove_requests(request_ids)
        if self.structured_output is not None:
            self.structured_output.remove_requests(request_ids)
        if self.speculator is not None:
            self.speculator.remove_requests(request_ids)

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput,
                      before_sample: Callable[[], None] | None = None) -> PendingRunnerOutput:
        """Launch one scheduled batch and its sampling; `.result()` gives the tokens of the requests
        that sample (see the module docstring). `before_sample` (only when the step samples) runs once
        the forward pass is launched, before the grammar bitmask is filled: the engine applies the
        previous step's tokens there (the grammar matchers need them) while the device runs this one."""
        self.remove_requests(scheduler_output.finished_req_ids)
        if scheduler_output.is_empty:
            return PendingRunnerOutput()
        rows = sample_rows(scheduler_output.scheduled)
        # Built before the forward pass: its small host-to-device copies then do not wait for it.
        # NOTE: and before the step is broadcast: once it is, nothing may fail on rank 0 before the
        # forward pass, or the other ranks would wait in its collectives for good.
        sampling_metadata = self.sampling.build(rows) if rows else None
        batch = self.prepare_inputs(scheduler_output.scheduled)
        self._prev_rows = {r.sched.request_id: i for i, r in enumerate(rows)} if self.is_async else {}
        hidden = self.forward(batch)
        logits = None if sampling_metadata is None else self.model.compute_logits(logits_rows(hidden, batch))
        if sampling_metadata is None:
            self._end_step(batch.step_id)
            return PendingRunnerOutput()
        assert logits is not None
        if before_sample is not None:
            before_sample()
        if self.structured_output is not None:  # the host fills the grammar bitmask while the device runs
            bitmask = self.structured_output.fill_bitmask(
                [(s.request_id, s.spec_token_ids) for s in scheduler_output.scheduled if s.needs_sample])
            sampling_metadata.token_bitmask = None if bitmask is None else self.to_device(bitmask)
        has_drafts = self.speculator is not None and any(r.draft_index for r in rows)
        if has_drafts:
            out = self.speculator.verify(logits, sampling_metadata, rows)  # type: ignore[union-attr]
        else:
            out = self.sampler(logits, sampling_metadata)
        if self.is_async:
            self._prev_sampled = tensor_parallel_broadcast(out.sampled)
        self._end_step(batch.step_id)
        pending = PendingRunnerOutput(rows, out)  # (its copy to the host is queued before the drafts)
        if has_drafts:
            self.speculator.propose_ahead(rows, out.sampled)  # type: ignore[union-attr]
        return pending

    def forward(self, batch: BatchInputs) -> torch.Tensor:
        """The model's hidden states for a prepared batch: the CUDA graph the batch names, else eager."""
        if self.tp_size > 1 and debug.is_enabled():  # what this rank is about to run, checked before it does
            debug.record(f"forward:{batch.graph_kind.name}:{batch.graph_key}:{batch.input_ids.shape[0]}")
            debug.check(batch.step_id, "before the forward pass")
        graphs = self._graphs(batch.graph_kind)
        if graphs is not None:
            return graphs.run(batch, batch.graph_key)
        if batch.graph_kind is not GraphKind.EAGER:
            raise RuntimeError(f"rank {self.rank} has no {batch.graph_kind.name} CUDA graphs, but rank 0 replays "
                               f"one at step {batch.step_id}; the ranks' graph plans differ")
        self.backend.prepare(batch.meta)
        return self.model(batch.input_ids, batch.positions, batch.meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """float32 logits of these hidden states (None on tensor-parallel ranks other than 0)."""
        return self.model.compute_logits(hidden)

    def _graphs(self, kind: GraphKind) -> CUDAGraphRunner | None:
        return {GraphKind.DECODE: self.decode_graphs, GraphKind.MULTI_TOKEN: self.multi_token_graphs}.get(kind)

    def _choose_graph(self, num_seqs: int, num_tokens: int, max_query_len: int,
                      num_block_columns: int) -> tuple[GraphKind, int]:
        """(graph kind, graph key) that runs a step of this shape; (EAGER, 0) for none."""
        for kind in (GraphKind.DECODE, GraphKind.MULTI_TOKEN):
            graphs = self._graphs(kind)
            key = None if graphs is None else graphs.bucket(num_seqs, num_tokens, max_query_len, num_block_columns)
            if key is not None:
                return kind, key
        return GraphKind.EAGER, 0

    def _end_step(self, step_id: int) -> None:
        if self.tp_size > 1:
            debug.check(step_id, "at the end")

    def prepare_inputs(self, scheduled: list[ScheduledRequest]) -> BatchInputs:
        """Rank 0: the device inputs of these scheduled requests (input_batch.py), broadcast to the
        other ranks first when there are any; drafts on the device are filled in by the speculator."""
        step = flatten_step(scheduled, self.block_size, self.num_steps + 1, self._prev_rows, self._choose_graph)
        self.num_steps += 1
        if self.step_broadcaster is not None:  # first: the other ranks start while this one uploads
            self.step_broadcaster(step.header, step.flat)
        batch = batch_from_flat(step.header, self.upload(step.flat), self.block_size, self._prev_sampled, self.rank)
        if step.device_drafts is not None:  # drafts the draft model left on the device (rank 0 alone)
            assert self.speculator is not None
            drafts = step.device_drafts
            self.speculator.fill_drafts(batch.input_ids, drafts.positions, drafts.request_ids, drafts.draft_indices)
        return batch

    def decode_batch(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
        query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int,
    ) -> BatchInputs:
        """A decode batch (one query token per sequence) from inputs already on the device, for
        `forward`; replays a CUDA graph when one fits. int64 `input_ids`, `positions` and `slot_mapping`;
        int32 `query_start_loc` (its first num_seqs entries are the logits indices), `seq_lens` and
        `block_tables`. Single-rank runners only (nothing is broadcast)."""
        assert self.tp_size == 1 and self.step_broadcaster is None
        num_seqs = int(seq_lens.shape[0])
        graph_kind, graph_key = self._choose_graph(num_seqs, num_seqs, 1, int(block_tables.shape[1]))
        self.num_steps += 1
        meta = AttentionMetadata(
            slot_mapping=slot_mapping, query_start_loc=query_start_loc, seq_lens=seq_lens,
            block_tables=block_tables, max_query_len=1, max_seq_len=max_seq_len, block_size=self.block_size,
        )
        return BatchInputs(
            input_ids=input_ids, positions=positions, meta=meta, logits_indices=query_start_loc[:num_seqs],
            is_uniform_decode=True, step_id=self.num_steps, graph_kind=graph_kind, graph_key=graph_key,
        )

    @torch.inference_mode()
    def follow_step(self, header: StepHeader, inputs: np.ndarray) -> None:
        """Tensor-parallel ranks 1..N-1: rank 0's step on this rank's shard (joins its collectives).

        Raises RuntimeError when the header is not the next step (a lost or repeated header)."""
        if header.step_id != self.num_steps + 1:
            raise RuntimeError(f"rank {self.rank} expected step {self.num_steps + 1}, got step {header.step_id}")
        self.num_steps = header.step_id
        batch = batch_from_flat(header, self.upload(inputs), self.block_size, self._prev_sampled, self.rank)
        hidden = self.forward(batch)
        if header.num_logits:
            self.model.compute_logits(logits_rows(hidden, batch))
            if self.is_async:  # rank 0's sampled tokens: the next step's placeholder inputs
                self._prev_sampled = tensor_parallel_broadcast(
                    torch.empty(header.num_logits, dtype=torch.int64, device=self.device))
        self._end_step(header.step_id)

    # -- host -> device ----------------------------------------------------------------------------
    def upload_arrays(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """Integer arrays -> one flat int64 tensor on the device, in one (pinned, async) copy."""
        return self.upload(concat_int64(arrays))

    def upload(self, flat: np.ndarray) -> torch.Tensor:
        """A host array -> the device, without waiting for the device."""
        return self.to_device(torch.from_numpy(flat))

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A small host tensor on the device without waiting for the device (host_staging.py)."""
        return self._staging.to_device(t) if self._staging is not None else t
