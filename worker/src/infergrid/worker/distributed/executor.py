"""Executors: how LLMEngine runs the model, on one process (UniProcExecutor, here) or on N
tensor-parallel ranks (MultiProcExecutor, multiproc_executor.py).

    LLMEngine --SchedulerOutput--> Executor.execute_model --> ModelRunner (rank 0) --> PendingRunnerOutput
                                       |
            MultiProcExecutor only:    +-- per step: header + inputs over each rank's pipe
                                       +-- ranks 1..N-1: processes (rank_process.py -> worker_proc.py),
                                           one per GPU

The executor builds rank 0's runner and, when speculating, the SpeculativeDecoder around it
(`spec_decoder`), which it hands to the runner as its Speculator and the engine takes from here; it
sizes the KV cache for both (the draft model's pool mirrors the target's block ids).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable

from infergrid.worker.config import EngineConfig
from infergrid.worker.distributed.messages import GraphPlan
from infergrid.worker.engine.scheduler_output import SchedulerOutput
from infergrid.worker.model_config import ModelConfig
from infergrid.worker.runner.model_runner import ModelRunner
from infergrid.worker.runner.runner_output import PendingRunnerOutput
from infergrid.worker.spec_decode.speculative_decoder import SpeculativeDecoder


class RankDiedError(RuntimeError):
    """A tensor-parallel rank exited; the engine can make no further progress."""


class Executor(ABC):
    """Runs the model for LLMEngine. `driver_runner` is rank 0's ModelRunner (the one that samples);
    `spec_decoder` its speculative decoder (None without speculation)."""

    driver_runner: ModelRunner
    spec_decoder: SpeculativeDecoder | None = None

    def _attach_spec_decoder(self, config: EngineConfig) -> None:
        """Build the speculative decoder around rank 0's runner and hand it to the runner."""
        if config.speculative_method is not None:
            self.spec_decoder = SpeculativeDecoder(self.driver_runner)
            self.driver_runner.speculator = self.spec_decoder

    def _initialize_kv_cache(self, plan: GraphPlan | None = None) -> int:
        """Rank 0's KV cache (and its graphs), sized for the draft model's pool too; then the draft's."""
        spec = self.spec_decoder
        num_blocks = self.driver_runner.initialize_kv_cache(
            plan, extra_block_bytes=spec.extra_kv_block_bytes() if spec is not None else 0)
        if spec is not None:
            spec.initialize_kv_cache(num_blocks)
        return num_blocks

    @property
    @abstractmethod
    def rank_pids(self) -> list[int]:
        """Process id of every rank, rank 0 first."""

    @abstractmethod
    def initialize_kv_cache(self) -> int:
        """Size and allocate the KV cache on every rank; returns the number of blocks (same on all)."""

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput,
                      before_sample: Callable[[], None] | None = None) -> PendingRunnerOutput:
        """Launch one step on every rank; `.result()` gives rank 0's sampled tokens. `before_sample`
        runs on rank 0 once the forward pass is launched, before its sampling (ModelRunner.execute_model)."""

    @abstractmethod
    def check_health(self) -> None:
        """Raise RankDiedError when a rank is gone."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop every rank (idempotent)."""


class UniProcExecutor(Executor):
    """tensor_parallel_size 1: the model runs in the engine process."""

    def __init__(self, config: EngineConfig, model_dir: str, model_config: ModelConfig, max_model_len: int,
                 eos_token_ids: list[int]) -> None:
        self.driver_runner = ModelRunner(config, model_dir, model_config, max_model_len, eos_token_ids)
        self._attach_spec_decoder(config)

    @property
    def rank_pids(self) -> list[int]:
        return [os.getpid()]

    def initialize_kv_cache(self) -> int:
        return self._initialize_kv_cache()

    def execute_model(self, scheduler_output: SchedulerOutput,
                      before_sample: Callable[[], None] | None = None) -> PendingRunnerOutput:
        return self.driver_runner.execute_model(scheduler_output, before_sample)

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        return None
