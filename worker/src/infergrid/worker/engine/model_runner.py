"""ModelRunner: SchedulerOutput -> input tensors -> model -> logits at sampling positions -> tokens.

Owns the model, the paged KV cache, the sampler, per-request seeded generators and (on CUDA) the
decode CUDA graphs. Inputs are flattened over the batch (see layers/attention.py for the layout).
Requests with draft tokens sample at every draft position plus one and are verified by rejection
sampling (spec_decode/), which keeps the target distribution exactly; a request keeps its tokens up
to and including the first rejected position. Constrained requests (structured output) get their
grammar bitmask filled on the host after the forward pass is launched, so it overlaps the device's work.

Tensor parallel: every rank has a ModelRunner over its shard. Rank 0's `execute_model` hands the
step's flat inputs to `step_broadcaster` (set by the MultiProcExecutor) before its forward pass; the
other ranks run the same forward in `follow_step` and join the logits gather, and only rank 0 samples.
NOTE: every choice that changes a step's collectives is rank 0's and travels in the step header (the
step id, the CUDA graph and its padded batch size); the graphs captured are rank 0's GraphPlan.

Async scheduling: `execute_model` only launches the step. Its sampled tokens are copied to pinned host
memory behind a CUDA event, and `PendingRunnerOutput.result()` waits for that event alone, so the
engine schedules and launches the next step while this one runs. An input token the previous step
is still sampling (PLACEHOLDER_TOKEN_ID) is filled in on the device from that step's sampled tokens;
with tensor parallelism rank 0 broadcasts its sampled tokens so that every rank can do the same.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

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
from infergrid.worker.engine.host_staging import PinnedStaging
from infergrid.worker.engine.kv_cache import determine_num_blocks
from infergrid.worker.engine.scheduler import (
    DRAFT_PLACEHOLDER_ID,
    PLACEHOLDER_TOKEN_ID,
    ScheduledRequest,
    SchedulerOutput,
)
from infergrid.worker.layers.attention import AttentionMetadata
from infergrid.worker.layers.attention_backends import get_attention_backend
from infergrid.worker.layers.sampler import Sampler, SamplerOutput, SamplingMetadata
from infergrid.worker.loader import load_model, resolve_dtype
from infergrid.worker.model_config import ModelConfig
from infergrid.worker.sampling_params import SamplingParams
from infergrid.worker.spec_decode.speculative_decoder import SpeculativeDecoder
from infergrid.worker.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)


@dataclass
class TokenLogprobs:
    """Logprobs of one sampled token: `token_ids[0]` is the sampled token, then the top-k."""

    token_ids: list[int]
    logprobs: list[float]
    sampled_rank: int


@dataclass
class ModelRunnerOutput:
    """Per request that sampled: its new token ids (accepted drafts + one) and their logprobs."""

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


class PendingRunnerOutput:
    """A launched step's output on its way to the host; `result()` waits for this step only (later
    steps queued on the device keep running)."""

    def __init__(self, rows: list[_SampleRow] | None = None, out: SamplerOutput | None = None) -> None:
        self._rows, self._output = rows or [], None if out is not None else ModelRunnerOutput()
        self._host: list[torch.Tensor | None] = []
        self._event: torch.cuda.Event | None = None
        if out is not None:
            tensors = [out.sampled, out.logprob_token_ids, out.logprobs, out.sampled_ranks]
            is_cuda = out.sampled.is_cuda
            self._host = [None if t is None else t.to("cpu", non_blocking=is_cuda) for t in tensors]
            if is_cuda:
                self._event = torch.cuda.Event()
                self._event.record()

    def result(self) -> ModelRunnerOutput:
        """The step's tokens (and logprobs); blocks until they are on the host."""
        if self._output is None:
            if self._event is not None:
                self._event.synchronize()
            self._output = _make_output(self._rows, *self._host)  # type: ignore[arg-type]
        return self._output


@dataclass
class _BatchInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    is_uniform_decode: bool
    step_id: int = 0
    graph_kind: GraphKind = GraphKind.EAGER
    graph_key: int = 0  # which graph of that kind (GraphSet key: decode = padded batch size)


@dataclass
class _SampleRow:
    sched: ScheduledRequest
    draft_index: int  # 0 .. len(spec_token_ids): which of the request's sampling positions


def resolve_device(device: str | None, rank: int = 0) -> torch.device:
    """None -> cuda when available, else cpu; tensor-parallel rank r gets the r-th GPU from there."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", (torch.cuda.current_device() if dev.index is None else dev.index) + rank)
    return dev


class ModelRunner:
    """Runs one model on one device for the engine."""

    def __init__(
        self,
        config: EngineConfig,
        model_dir: str,
        model_config: ModelConfig,
        max_model_len: int,
        eos_token_ids: list[int],
        rank: int = 0,
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
        self.num_kv_heads = kv_head_layout(model_config.num_key_value_heads, self.tp_size)[0]  # on this rank
        # Rank 0 of several: called with each step's header and flat inputs before the forward pass.
        self.step_broadcaster: Callable[[StepHeader, np.ndarray], None] | None = None
        self.sampler = Sampler()
        self.vocab_size = model_config.vocab_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.generators: dict[str, torch.Generator] = {}
        self.kv_cache: torch.Tensor | None = None
        self.num_blocks = 0
        self.cuda_graphs = None  # CUDAGraphRunner when captured
        self.multi_token_graphs = None  # spec_decode MultiTokenCUDAGraphRunner (verification batches)
        self.num_steps = 0  # steps prepared (rank 0) or followed (other ranks); the step id is the count
        # Async scheduling: the last step's sampled tokens on the device (on every rank) and, on rank 0,
        # each request's row in them (where its placeholder input token comes from).
        self.is_async = config.async_scheduling
        self._prev_sampled: torch.Tensor | None = None
        self._staging = PinnedStaging(self.device) if self.device.type == "cuda" else None
        self._prev_rows: dict[str, int] = {}
        # Speculative decoding (proposers, verifier) lives on the rank that samples.
        self.spec_decoder: SpeculativeDecoder | None = None
        if config.speculative_method is not None and rank == 0:
            self.spec_decoder = SpeculativeDecoder(self)
        # Structured output (rank 0, set by the engine): grammar matchers that fill each step's bitmask.
        self.structured_output: StructuredOutputManager | None = None

    # -- KV cache ----------------------------------------------------------------------------------
    def graph_plan(self) -> GraphPlan:
        """The CUDA graphs this runner would capture (rank 0's plan is every rank's)."""
        can_capture = ((self.device.type == "cuda" and self.backend.name == "triton")
                       or (self.device.type == "cpu" and envs.emulate_cuda_graphs()))
        if self.config.enforce_eager or not can_capture:
            return GraphPlan()
        from infergrid.worker.engine.cuda_graph import default_max_batch_size

        max_bs, k = default_max_batch_size(self.config.max_num_seqs), self.config.num_speculative_tokens
        return GraphPlan(max_bs, max_bs if k > 0 else 0, 1 + k if k > 0 else 0)

    def initialize_kv_cache(self, plan: GraphPlan | None = None) -> int:
        """Size (profiling on CUDA), allocate and bind the KV cache; capture the CUDA graphs of `plan`
        (default: `graph_plan()`). Returns the number of blocks (null block included)."""
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
                num_blocks_override=self.config.num_gpu_blocks_override,
                profile_run=self.profile_run,
                extra_block_bytes=self.spec_decoder.extra_kv_block_bytes() if self.spec_decoder else 0,
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
        if self.spec_decoder is not None:
            self.spec_decoder.initialize_kv_cache(self.num_blocks)
        if is_tp:
            debug.check(0, "after INIT_KV_CACHE")
        return self.num_blocks

    def _capture_graphs(self, plan: GraphPlan) -> None:
        from infergrid.worker.engine.cuda_graph import CUDAGraphRunner
        from infergrid.worker.spec_decode.verify_graph import MultiTokenCUDAGraphRunner

        # Every rank enters the captures with no collective in flight and leaves them together.
        if self.tp_size > 1:
            tensor_parallel_barrier(self.device)
        if plan.decode_max_batch_size:
            self.cuda_graphs = CUDAGraphRunner(self, plan.decode_max_batch_size)
            self.cuda_graphs.capture()
        if plan.multi_token_max_query_len:
            self.multi_token_graphs = MultiTokenCUDAGraphRunner(self, plan.multi_token_max_query_len,
                                                                plan.multi_token_max_batch_size)
            self.multi_token_graphs.capture()
        if self.tp_size > 1:
            tensor_parallel_barrier(self.device)

    def release_cuda_graphs(self) -> None:
        """Destroy this runner's CUDA graphs (idempotent); later steps run eagerly.

        NOTE: call it on every rank before leaving an NCCL group: NCCL (>= 2.26) destroys or aborts
        a communicator only once every graph that captured one of its collectives is gone."""
        for graphs in (self.cuda_graphs, self.multi_token_graphs):
            if graphs is not None:
                graphs.release()
        self.cuda_graphs = self.multi_token_graphs = None

    @torch.inference_mode()
    def profile_run(self) -> None:
        """A forward pass at the largest batch the scheduler can form (no KV cache yet) plus sampling."""
        budget = min(self.config.get_max_num_batched_tokens(), self.config.max_num_seqs * self.max_model_len)
        seq_len = min(self.max_model_len, budget)
        lens = [seq_len] * (budget // seq_len) + ([budget % seq_len] if budget % seq_len else [])
        qsl = torch.tensor(np.cumsum([0, *lens]), dtype=torch.int32, device=self.device)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(budget, dtype=torch.int64, device=self.device),
            query_start_loc=qsl,
            seq_lens=seq_lens,
            block_tables=torch.zeros((len(lens), 0), dtype=torch.int32, device=self.device),
            max_query_len=seq_len,
            max_seq_len=seq_len,
            block_size=self.block_size,
            has_kv_cache=False,
        )
        self.backend.prepare(meta)
        input_ids = torch.zeros(budget, dtype=torch.int64, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
        hidden = self.model(input_ids, positions, meta)
        num_rows = min(self.config.max_num_seqs, budget)
        logits = self.model.compute_logits(hidden[:num_rows])
        if logits is not None:  # None on tensor-parallel ranks other than 0 (they never sample)
            temperature = torch.ones(num_rows, device=self.device)
            self.sampler(logits, SamplingMetadata(temperature=temperature, all_greedy=False, max_num_logprobs=20))

    # -- one step ----------------------------------------------------------------------------------
    def remove_requests(self, request_ids: set[str]) -> None:
        """Forget per-request state (seeded generators) of finished requests."""
        for req_id in request_ids:
            self.generators.pop(req_id, None)
        if self.structured_output is not None:
            self.structured_output.remove_requests(request_ids)
        if self.spec_decoder is not None:
            self.spec_decoder.remove_requests(request_ids)

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput,
                      before_sample: Callable[[], None] | None = None) -> PendingRunnerOutput:
        """Launch one scheduled batch and its sampling; `.result()` gives the tokens of the requests
        that sample (see the module docstring). `before_sample` (only when the step samples) runs once
        the forward pass is launched, before the grammar bitmask is filled: the engine finishes the
        previous step there, whose tokens the grammar matchers need, while the device runs this one."""
        self.remove_requests(scheduler_output.finished_req_ids)
        if scheduler_output.is_empty:
            return PendingRunnerOutput()
        rows = self._sample_rows(scheduler_output.scheduled)
        # Built before the forward pass: its small host-to-device copies then do not wait for it.
        # NOTE: and before the step is broadcast: once it is, nothing may fail on rank 0 before the
        # forward pass, or the other ranks would wait in its collectives for good.
        sampling_metadata = self._sampling_metadata(rows) if rows else None
        batch = self._prepare_inputs(scheduler_output.scheduled)
        self._prev_rows = {r.sched.request_id: i for i, r in enumerate(rows)} if self.is_async else {}
        hidden = self._forward(batch)
        logits = None if sampling_metadata is None else self.model.compute_logits(_logits_rows(hidden, batch))
        if sampling_metadata is None:
            self._end_step(batch.step_id)
            return PendingRunnerOutput()
        assert logits is not None
        if before_sample is not None:
            before_sample()
        if self.structured_output is not None:  # the host fills the grammar bitmask while the device runs
            bitmask = self.structured_output.fill_bitmask(
                [(s.request_id, s.spec_token_ids) for s in scheduler_output.scheduled if s.needs_sample])
            sampling_metadata.token_bitmask = None if bitmask is None else self._to_device(bitmask)
        if self.spec_decoder is not None and any(r.draft_index for r in rows):  # drafts to verify
            out = self.spec_decoder.verify(logits, sampling_metadata, rows)
        else:
            out = self.sampler(logits, sampling_metadata)
        if self.is_async:
            self._prev_sampled = tensor_parallel_broadcast(out.sampled)
        self._end_step(batch.step_id)
        pending = PendingRunnerOutput(rows, out)  # (its copy to the host is queued before the drafts)
        if self.spec_decoder is not None and any(r.draft_index for r in rows):
            self.spec_decoder.propose_ahead(rows, out.sampled)
        return pending

    def propose_draft_token_ids(
        self, scheduler_output: SchedulerOutput, sampled_token_ids: dict[str, list[int]], pipelined: bool = False,
    ) -> dict[str, list[int]]:
        """Speculative decoding, after the scheduler applied this step (run `pipelined` or not): next
        step's drafts per request."""
        if self.spec_decoder is None:
            return {}
        return self.spec_decoder.propose(scheduler_output, sampled_token_ids, pipelined)

    def _forward(self, batch: _BatchInputs) -> torch.Tensor:
        if self.tp_size > 1 and debug.is_enabled():  # what this rank is about to run, checked before it does
            debug.record(f"forward:{batch.graph_kind.name}:{batch.graph_key}:{batch.input_ids.shape[0]}")
            debug.check(batch.step_id, "before the forward pass")
        if batch.graph_kind is GraphKind.DECODE and self.cuda_graphs is not None:
            return self.cuda_graphs.run(batch, batch.graph_key)
        if batch.graph_kind is GraphKind.MULTI_TOKEN and self.multi_token_graphs is not None:
            return self.multi_token_graphs.run(batch, batch.graph_key)
        if batch.graph_kind is not GraphKind.EAGER:
            raise RuntimeError(f"rank {self.rank} has no {batch.graph_kind.name} CUDA graphs, but rank 0 replays "
                               f"one at step {batch.step_id}; the ranks' graph plans differ")
        self.backend.prepare(batch.meta)
        return self.model(batch.input_ids, batch.positions, batch.meta)

    def _choose_graph(self, num_seqs: int, num_tokens: int, max_query_len: int,
                      num_block_columns: int) -> tuple[GraphKind, int]:
        """(graph kind, graph key) that runs a step of this shape; (EAGER, 0) for none."""
        if self.cuda_graphs is not None and max_query_len == 1:
            bs = self.cuda_graphs.bucket(num_seqs)
            if bs is not None:
                return GraphKind.DECODE, bs
        if self.multi_token_graphs is not None:
            key = self.multi_token_graphs.bucket(num_seqs, num_tokens, max_query_len, num_block_columns)
            if key is not None:
                return GraphKind.MULTI_TOKEN, key
        return GraphKind.EAGER, 0

    def _end_step(self, step_id: int) -> None:
        if self.tp_size > 1:
            debug.check(step_id, "at the end")

    def _prepare_inputs(self, scheduled: list[ScheduledRequest]) -> _BatchInputs:
        bs = self.block_size
        num_seqs = len(scheduled)
        q_lens = np.fromiter((s.num_new_tokens for s in scheduled), dtype=np.int64, count=num_seqs)
        starts = np.fromiter((s.num_computed_tokens for s in scheduled), dtype=np.int64, count=num_seqs)
        qsl = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        total = int(qsl[-1])
        input_ids = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in scheduled), np.int64, total)
        block_tables = np.zeros((num_seqs, max(len(s.block_ids) for s in scheduled)), dtype=np.int64)
        for i, s in enumerate(scheduled):
            block_tables[i, : len(s.block_ids)] = s.block_ids
        seq_of_token = np.repeat(np.arange(num_seqs), q_lens)
        positions = starts[seq_of_token] + np.arange(total) - qsl[:-1][seq_of_token]
        slot_mapping = block_tables[seq_of_token, positions // bs] * bs + positions % bs
        logits_indices = [
            j for s, end in zip(scheduled, qsl[1:].tolist(), strict=True) if s.needs_sample
            for j in range(end - 1 - len(s.spec_token_ids), end)
        ]
        seq_lens = starts + q_lens
        max_query_len = int(q_lens.max())
        placeholders = np.flatnonzero(input_ids == PLACEHOLDER_TOKEN_ID)
        device_drafts = np.flatnonzero(input_ids == DRAFT_PLACEHOLDER_ID)
        try:  # each placeholder's row in the previous step's sampled tokens
            placeholder_rows = [self._prev_rows[scheduled[i].request_id] for i in seq_of_token[placeholders].tolist()]
        except KeyError as exc:
            raise RuntimeError(f"request {exc.args[0]!r} has a placeholder input token, but sampled nothing "
                               "in the previous step") from None
        graph_kind, graph_key = self._choose_graph(num_seqs, total, max_query_len, block_tables.shape[1])
        self.num_steps += 1
        header = StepHeader(
            num_tokens=total, num_seqs=num_seqs, num_block_columns=block_tables.shape[1],
            num_logits=len(logits_indices), max_query_len=max_query_len, max_seq_len=int(seq_lens.max()),
            step_id=self.num_steps, graph_kind=graph_kind, graph_key=graph_key,
            num_placeholders=len(placeholders),
        )
        # NOTE: the order is the flat layout of distributed/messages.py.
        flat = _concat_int64([input_ids, positions, slot_mapping, qsl, seq_lens, block_tables,
                              np.asarray(logits_indices, dtype=np.int64), placeholders,
                              np.asarray(placeholder_rows, dtype=np.int64)])
        if self.step_broadcaster is not None:  # first: the other ranks start while this one uploads
            self.step_broadcaster(header, flat)
        batch = self._batch_from_flat(header, self._upload(flat))
        if device_drafts.size:  # drafts the draft model left on the device (rank 0 alone: no TP with it)
            assert self.spec_decoder is not None
            seqs = seq_of_token[device_drafts]
            spec_lens = np.fromiter((len(s.spec_token_ids) for s in scheduled), dtype=np.int64, count=num_seqs)
            self.spec_decoder.fill_drafts(batch.input_ids, device_drafts,
                                          [scheduled[i].request_id for i in seqs.tolist()],
                                          device_drafts - (qsl[1:][seqs] - spec_lens[seqs]))
        return batch

    def decode_batch(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
        query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int,
    ) -> _BatchInputs:
        """A decode batch (one query token per sequence) from inputs already on the device, for
        `_forward`; replays a CUDA graph when one fits. int64 `input_ids`, `positions` and `slot_mapping`;
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
        return _BatchInputs(
            input_ids=input_ids, positions=positions, meta=meta, logits_indices=query_start_loc[:num_seqs],
            is_uniform_decode=True, step_id=self.num_steps, graph_kind=graph_kind,
            graph_key=graph_key,
        )

    def _batch_from_flat(self, header: StepHeader, flat: torch.Tensor) -> _BatchInputs:
        """Device tensors of one step from its flat int64 inputs (views, plus int32 casts), with the
        placeholder input tokens taken from the previous step's sampled tokens."""
        (input_ids, positions, slots, qsl, seq_lens, tables, logits_indices, placeholders,
         placeholder_rows) = flat.split(header.split_sizes())
        if header.num_placeholders:
            if self._prev_sampled is None:
                raise RuntimeError(f"rank {self.rank}: step {header.step_id} has placeholder input tokens, "
                                   "but no earlier step sampled")
            input_ids[placeholders] = self._prev_sampled[placeholder_rows]
        tables = tables.view(header.num_seqs, header.num_block_columns)
        if header.graph_kind is GraphKind.EAGER:  # (a graph's inputs are cast as they are staged: graph_inputs.py)
            qsl, seq_lens, tables = qsl.to(torch.int32), seq_lens.to(torch.int32), tables.to(torch.int32)
        meta = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=qsl,
            seq_lens=seq_lens,
            block_tables=tables,
            max_query_len=header.max_query_len,
            max_seq_len=header.max_seq_len,
            block_size=self.block_size,
        )
        return _BatchInputs(
            input_ids=input_ids,
            positions=positions,
            meta=meta,
            logits_indices=logits_indices,
            is_uniform_decode=header.max_query_len == 1,
            step_id=header.step_id,
            graph_kind=header.graph_kind,
            graph_key=header.graph_key,
        )

    @torch.inference_mode()
    def follow_step(self, header: StepHeader, inputs: np.ndarray) -> None:
        """Tensor-parallel ranks 1..N-1: rank 0's step on this rank's shard (joins its collectives).

        Raises RuntimeError when the header is not the next step (a lost or repeated header)."""
        if header.step_id != self.num_steps + 1:
            raise RuntimeError(f"rank {self.rank} expected step {self.num_steps + 1}, got step {header.step_id}")
        self.num_steps = header.step_id
        batch = self._batch_from_flat(header, self._upload(inputs))
        hidden = self._forward(batch)
        if header.num_logits:
            self.model.compute_logits(_logits_rows(hidden, batch))
            if self.is_async:  # rank 0's sampled tokens: the next step's placeholder inputs
                self._prev_sampled = tensor_parallel_broadcast(
                    torch.empty(header.num_logits, dtype=torch.int64, device=self.device))
        self._end_step(header.step_id)

    def _upload_flat(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """Integer arrays -> one flat int64 tensor on the device, in one (pinned, async) copy."""
        return self._upload(_concat_int64(arrays))

    def _upload(self, flat: np.ndarray) -> torch.Tensor:
        return self._to_device(torch.from_numpy(flat))

    # -- sampling ----------------------------------------------------------------------------------
    @staticmethod
    def _sample_rows(scheduled: list[ScheduledRequest]) -> list[_SampleRow]:
        return [
            _SampleRow(s, j) for s in scheduled if s.needs_sample for j in range(len(s.spec_token_ids) + 1)
        ]

    def _sampling_metadata(self, rows: list[_SampleRow]) -> SamplingMetadata:
        params: list[SamplingParams] = [r.sched.request.sampling_params for r in rows]
        floats = self._float_tensor
        greedy = [p.is_greedy for p in params]
        all_greedy = all(greedy)
        temperature = None if all_greedy else floats([0.0 if g else p.temperature
                                                      for g, p in zip(greedy, params, strict=True)])
        meta = SamplingMetadata(temperature=temperature, all_greedy=all_greedy)
        if not meta.all_greedy:
            if any(p.top_p < 1.0 for p in params):
                meta.top_p = floats([p.top_p for p in params])
            if any(p.top_k > 0 for p in params):
                meta.top_k = self._to_device(torch.tensor([p.top_k if p.top_k > 0 else self.vocab_size
                                                           for p in params]))
            if any(p.min_p > 0 for p in params):
                meta.min_p = floats([p.min_p for p in params])
        if any(p.has_penalties for p in params):  # (the engine resolves the previous step first: no placeholders)
            # (rows without penalties need no history: their drafts may still be on the device)
            meta.output_token_ids = [r.sched.request.output_token_ids + r.sched.spec_token_ids[: r.draft_index]
                                     if p.has_penalties else [] for r, p in zip(rows, params, strict=True)]
            if any(p.presence_penalty for p in params):
                meta.presence_penalty = floats([p.presence_penalty for p in params])
            if any(p.frequency_penalty for p in params):
                meta.frequency_penalty = floats([p.frequency_penalty for p in params])
            if any(p.repetition_penalty != 1.0 for p in params):
                meta.repetition_penalty = floats([p.repetition_penalty for p in params])
                meta.prompt_token_ids = [r.sched.request.prompt_token_ids for r in rows]
        for i, (row, p) in enumerate(zip(rows, params, strict=True)):
            if p.seed is not None and not greedy[i]:
                meta.generators[i] = self._generator(row.sched.request_id, p.seed)
            request = row.sched.request
            # Output tokens before this row's: the known ones, those still being sampled by the previous
            # step (async scheduling: every placeholder but this step's own), the drafts before it.
            num_before = request.num_output_tokens + max(request.num_output_placeholders - 1, 0) + row.draft_index
            if num_before < p.min_tokens:
                banned = list(p.stop_token_ids or ()) + ([] if p.ignore_eos else self.eos_token_ids)
                banned = [t for t in banned if t < self.vocab_size]
                if banned:
                    meta.banned_token_ids[i] = banned
        if any(p.logprobs is not None for p in params):
            meta.max_num_logprobs = max(p.logprobs or 0 for p in params)
        return meta

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A small host tensor on the device without waiting for the device (host_staging.py)."""
        return self._staging.to_device(t) if self._staging is not None else t

    def _float_tensor(self, values: list[float]) -> torch.Tensor:
        return self._to_device(torch.tensor(values, dtype=torch.float32))

    def _generator(self, request_id: str, seed: int) -> torch.Generator:
        gen = self.generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self.generators[request_id] = gen
        return gen


def _make_output(rows: list[_SampleRow], sampled_t: torch.Tensor, lp_ids_t: torch.Tensor | None,
                 lp_vals_t: torch.Tensor | None, ranks_t: torch.Tensor | None) -> ModelRunnerOutput:
    """Per request: its sampled tokens up to and including the first rejected draft (host tensors;
    the verifier set the rows after it to -1)."""
    sampled = sampled_t.tolist()
    lp_ids = lp_ids_t.tolist() if lp_ids_t is not None else None
    lp_vals = lp_vals_t.tolist() if lp_vals_t is not None else None
    ranks = ranks_t.tolist() if ranks_t is not None else None
    result = ModelRunnerOutput()
    for i, row in enumerate(rows):
        req_id = row.sched.request_id
        if sampled[i] < 0:
            continue
        tokens = result.sampled_token_ids.setdefault(req_id, [])
        tokens.append(sampled[i])
        if lp_ids is not None and row.sched.request.sampling_params.logprobs is not None:
            k = row.sched.request.sampling_params.logprobs
            entry = TokenLogprobs(lp_ids[i][: 1 + k], lp_vals[i][: 1 + k], ranks[i])  # type: ignore[index]
            result.logprobs.setdefault(req_id, []).append(entry)
    return result


def _logits_rows(hidden: torch.Tensor, batch: _BatchInputs) -> torch.Tensor:
    """The hidden states of the rows that sample. Every row, in order, when there are as many as
    tokens (decode, verification without prefill chunks): then no gather is launched."""
    if batch.logits_indices.shape[0] == hidden.shape[0]:
        return hidden
    return hidden[batch.logits_indices]


def _concat_int64(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.reshape(-1).astype(np.int64, copy=False) for a in arrays])
