"""LLMEngine: the synchronous engine. `step()` = schedule, run the model, update, make outputs.

With async scheduling (the default without speculative decoding) a step is pipelined with the next:

    step():  schedule N+1 | launch N+1 on the GPU | wait for N's tokens, update, make N's outputs
                                 (GPU: ... N ... | N+1 ...)

so the host's scheduling, input preparation and output processing overlap the GPU's work instead
of leaving it idle between steps. Step N+1 is scheduled before N's tokens are known (see the
scheduler's placeholders); the previous step is finished first when the next one needs its tokens on
the host (penalties) or nothing is left to launch. When a grammar needs them (structured output: its
bitmask is filled from them), only their application (scheduler and grammar matchers) sits between the
next step's forward pass and its sampling; detokenizing and making the outputs wait until that sampling
is launched, so they overlap it.
With speculative decoding a step is pipelined only while no request will propose drafts (the batch is
over the cutoff, or every request is cooling down: spec_decode/guard.py): otherwise the next step's
drafts are proposed from its tokens, so it runs synchronously.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from infergrid.worker.config import EngineConfig
from infergrid.worker.distributed.executor import Executor, UniProcExecutor
from infergrid.worker.distributed.multiproc_executor import MultiProcExecutor
from infergrid.worker.distributed.parallel_state import verify_tensor_parallel_size
from infergrid.worker.engine.output_processor import OutputProcessor
from infergrid.worker.engine.request import Request, RequestStatus
from infergrid.worker.engine.scheduler import Scheduler
from infergrid.worker.engine.scheduler_output import SchedulerOutput
from infergrid.worker.engine.stats import EngineStats
from infergrid.worker.loader import resolve_model_path
from infergrid.worker.model_config import ModelConfig
from infergrid.worker.outputs import RequestOutput
from infergrid.worker.runner.runner_output import ModelRunnerOutput, PendingRunnerOutput
from infergrid.worker.sampling_params import SamplingParams
from infergrid.worker.structured_output.grammar import GrammarCompiler
from infergrid.worker.structured_output.manager import StructuredOutputManager
from infergrid.worker.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]


def resolve_max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    """config.max_model_len, else the model's max_position_embeddings; never beyond the model's
    limit, and (no sliding-window attention yet) never beyond its sliding window."""
    limit = model_config.max_position_embeddings
    max_len = config.max_model_len or limit
    if max_len > limit:
        raise ValueError(f"max_model_len {max_len} exceeds the model's max_position_embeddings {limit}")
    window = model_config.sliding_window
    if window is not None and max_len > window:
        logger.warning("capping max_model_len %d to the model's sliding window %d", max_len, window)
        max_len = window
    return max_len


@dataclass
class _LaunchedStep:
    scheduler_output: SchedulerOutput
    output: PendingRunnerOutput
    is_pipelined: bool  # the next step is scheduled before this one's tokens are known
    applied: _AppliedStep | None = None  # its tokens, once applied to the scheduler (`_apply_step`)


@dataclass
class _AppliedStep:
    runner_output: ModelRunnerOutput
    num_outputs_before: list[int]  # per scheduled request, its output tokens before the step
    finished: list[Request]  # requests the scheduler finished (length, stop token)


def make_executor(config: EngineConfig, model_dir: str, model_config: ModelConfig, max_model_len: int,
                  eos_token_ids: list[int]) -> Executor:
    """UniProcExecutor for tensor_parallel_size 1, else MultiProcExecutor."""
    cls = MultiProcExecutor if config.tensor_parallel_size > 1 else UniProcExecutor
    return cls(config, model_dir, model_config, max_model_len, eos_token_ids)


def child_request_ids(request_id: str, n: int) -> list[str]:
    """Engine ids of the n sequences of one user request (the id itself when n == 1)."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample `index` of an n > 1 request: n=1 and, when seeded, seed + index."""
    seed = None if params.seed is None else params.seed + index
    return dataclasses.replace(params, n=1, seed=seed)


class LLMEngine:
    """Loads the model and runs requests step by step (not thread-safe; AsyncLLM wraps it)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_path = resolve_model_path(config.model, cache_dir=config.model_cache_dir)
        self.model_config = ModelConfig.from_pretrained(self.model_path)
        self.tokenizer = load_tokenizer(self.model_path)
        self.max_model_len = resolve_max_model_len(config, self.model_config)
        self.eos_token_ids = eos_token_ids(self.model_path, self.tokenizer) or list(self.model_config.eos_token_ids)
        mc = self.model_config
        verify_tensor_parallel_size(
            config.tensor_parallel_size, mc.num_attention_heads, mc.num_key_value_heads, mc.intermediate_size
        )
        # One process or tensor_parallel_size ranks; model_runner is rank 0's (the one that samples).
        self.model_executor = make_executor(
            config, self.model_path, self.model_config, self.max_model_len, self.eos_token_ids
        )
        self.model_runner = self.model_executor.driver_runner
        self.spec_decoder = self.model_executor.spec_decoder  # built by the executor (None: no speculation)
        try:
            self.num_blocks = self.model_executor.initialize_kv_cache()
        except BaseException:
            self.model_executor.shutdown()
            raise
        self.scheduler = Scheduler(config, self.num_blocks, self.max_model_len, self.eos_token_ids)
        self.output_processor = OutputProcessor(self.tokenizer)
        # Structured output: grammars compile on first use (xgrammar is not even imported before).
        threads = max(1, min(8, (os.cpu_count() or 2) // 2))  # compiles and per-step bitmask fills
        self.grammar_compiler = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids,
                                                threads)
        self.structured_output = StructuredOutputManager(self.grammar_compiler, threads)
        self.model_runner.structured_output = self.structured_output
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_steps_total = 0
        self.num_pipelined_steps_total = 0  # steps scheduled before the previous one's tokens were known
        self.last_step_time = time.monotonic()
        self._in_flight: _LaunchedStep | None = None  # async scheduling: launched, not finished yet

    # -- requests ----------------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        """Text -> token ids (with the tokenizer's BOS); token ids pass through after a range check."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        ids = list(prompt)
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]!r}")
        return ids

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        priority: int = 0,
        deadline: float | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request (n > 1 fans out into n sequences). `deadline` is absolute time.monotonic()
        seconds. Raises ValueError when the request can never run (too long for the model or pool)."""
        if request_id in self.output_processor.parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported yet")
        prompt_ids = self.tokenize(prompt)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        children = [
            (cid, child_params(params, i) if params.n > 1 else params)
            for i, cid in enumerate(child_request_ids(request_id, params.n))
        ]
        added: list[str] = []
        try:
            for cid, cparams in children:
                if cparams.structured_outputs is not None:  # (a cache hit when the server compiled it)
                    self.structured_output.add_request(cid, cparams.structured_outputs)
                self.scheduler.add_request(
                    Request(cid, prompt_ids, cparams, priority=priority, arrival_time=arrival, deadline=deadline)
                )
                added.append(cid)
        except ValueError:
            self.scheduler.abort_requests(added)
            self.structured_output.remove_requests(cid for cid, _ in children)
            raise
        self.output_processor.add_request(
            request_id, prompt if isinstance(prompt, str) else None, prompt_ids, children, arrival
        )

    def abort_request(self, request_ids: str | Iterable[str]) -> list[RequestOutput]:
        """Abort user requests (unknown ids are ignored); their KV blocks are freed at once.
        Returns their final outputs (unfinished samples with finish_reason "abort")."""
        finals = []
        for request_id in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            self.scheduler.abort_requests(self.output_processor.child_ids(request_id))
            final = self.output_processor.abort(request_id)
            if final is not None:
                finals.append(final)
        return finals

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self.output_processor.has_unfinished()

    # -- one step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule a batch and run it; returns outputs of requests that changed. With async
        scheduling, the outputs are the previous step's, and this step is left running."""
        is_pipelined = self._can_pipeline()
        scheduler_output = self.scheduler.schedule(pipelined=is_pipelined)
        outputs: list[RequestOutput] = []
        if self._in_flight is not None and (scheduler_output.is_empty or _reads_output_tokens(scheduler_output)):
            outputs += self._finish_in_flight()
        before_sample = None
        in_flight = self._in_flight
        if in_flight is not None and self._is_constrained(scheduler_output):
            # Grammar matchers need the step in flight's tokens before this one samples: they are applied
            # once this step's forward pass is launched (the device runs it meanwhile); the outputs are
            # made after this step's sampling is launched (below).
            def before_sample() -> None:
                self._apply_step(in_flight)
        pending = self.model_executor.execute_model(scheduler_output, before_sample)
        launched = _LaunchedStep(scheduler_output, pending, is_pipelined)
        outputs += self._finish_in_flight()
        if is_pipelined and not scheduler_output.is_empty:
            self._in_flight = launched
        else:
            outputs += self._finish_step(launched)
        return outputs

    def _is_constrained(self, scheduler_output: SchedulerOutput) -> bool:
        """Whether a request of the step samples under a grammar (structured output)."""
        so = self.structured_output
        return so.has_requests and any(s.needs_sample and so.is_constrained(s.request_id)
                                       for s in scheduler_output.scheduled)

    def _can_pipeline(self) -> bool:
        """Whether the step about to be scheduled may run ahead of its tokens (see the module docstring)."""
        if not self.scheduler.async_scheduling:
            return False
        spec = self.spec_decoder
        if spec is None:
            return True
        return spec.is_quiet()

    def _finish_in_flight(self) -> list[RequestOutput]:
        step, self._in_flight = self._in_flight, None
        return [] if step is None else self._finish_step(step)

    def _apply_step(self, step: _LaunchedStep) -> _AppliedStep:
        """Wait for a launched step's tokens and apply them to the scheduler and the grammar matchers
        (once: `_finish_step` makes the outputs later)."""
        if step.applied is not None:
            return step.applied
        scheduler_output = step.scheduler_output
        runner_output = step.output.result()
        num_outputs_before = [s.request.num_output_tokens for s in scheduler_output.scheduled]
        finished = self.scheduler.update_from_output(scheduler_output, runner_output.sampled_token_ids)
        if self.structured_output.has_requests:  # grammar matchers advance over the tokens kept
            for s, before in zip(scheduler_output.scheduled, num_outputs_before, strict=True):
                request = s.request
                if len(request.output_token_ids) > before:
                    self.structured_output.accept_tokens(request.request_id, request.output_token_ids[before:])
        step.applied = _AppliedStep(runner_output, num_outputs_before, finished)
        return step.applied

    def _finish_step(self, step: _LaunchedStep) -> list[RequestOutput]:
        """Apply a launched step's tokens (if not done yet), then its outputs and the next drafts."""
        scheduler_output = step.scheduler_output
        applied = self._apply_step(step)
        runner_output, num_outputs_before, finished = applied.runner_output, applied.num_outputs_before, applied.finished
        scheduled = [s.request for s in scheduler_output.scheduled]
        if self.spec_decoder is not None and scheduled:
            # NOTE: before the outputs are made, so that the draft model runs on the device while the
            # host detokenizes (a request a stop string ends there had its drafts proposed for nothing).
            drafts = self.spec_decoder.propose(scheduler_output, runner_output.sampled_token_ids, step.is_pipelined)
        outputs, stopped = self.output_processor.process(
            scheduled, runner_output, [*scheduler_output.expired_requests, *finished]
        )
        self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        if self.spec_decoder is not None and scheduled:
            self.scheduler.update_draft_token_ids(drafts)
        if scheduled:
            self._record_step(scheduled, num_outputs_before)
            self.num_pipelined_steps_total += step.is_pipelined
        return outputs

    def _record_step(self, scheduled: list[Request], num_outputs_before: list[int]) -> None:
        self.num_steps_total += 1
        self.last_step_time = time.monotonic()
        for request, before in zip(scheduled, num_outputs_before, strict=True):
            # Tokens appended this step (with drafts: accepted ones + 1, cut at a stop token).
            new = request.num_output_tokens - before
            self.generation_tokens_total += new
            if new and before == 0:  # the request's first token
                self.prompt_tokens_total += request.num_prompt_tokens

    def check_health(self) -> None:
        """Raise when the engine can no longer run (a tensor-parallel rank died)."""
        self.model_executor.check_health()

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks, if any (idempotent; the engine cannot step afterwards)."""
        try:
            self._finish_in_flight()  # no rank is left inside a step's collectives
        except Exception:  # noqa: BLE001 - a dead rank: shutting down is all that is left to do
            logger.warning("the step in flight failed at shutdown", exc_info=True)
        finally:
            self.model_executor.shutdown()

    def get_stats(self) -> EngineStats:
        return dataclasses.replace(
            self.scheduler.make_stats(),
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            last_step_time=self.last_step_time,
            num_steps_total=self.num_steps_total,
        )


def _reads_output_tokens(scheduler_output: SchedulerOutput) -> bool:
    """Whether a step's sampling reads its requests' earlier output tokens on the device (penalties), so
    the step before it must be finished before it is launched. (Grammars read them on the host: that
    step is finished after the forward pass is launched, see step().)"""
    return any(s.request.sampling_params.has_penalties for s in scheduler_output.scheduled)
