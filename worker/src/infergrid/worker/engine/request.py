"""The scheduler's view of one request: its tokens, progress, priority, deadline and status."""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections.abc import Sequence

from infergrid.worker.engine.prefix_hash import BlockHash, ExtraKeys
from infergrid.worker.sampling_params import SamplingParams

_arrival_seq = itertools.count()


class RequestStatus(enum.IntEnum):
    """Lifecycle: WAITING -> RUNNING (-> PREEMPTED -> RUNNING ...) -> FINISHED_*.

    FINISHED_DEADLINE: the request was still waiting (never started, or preempted) when its deadline
    passed. Its finish_reason is "abort" (the OpenAI-visible set stays stop|length|abort) and its
    stop_reason is "deadline", so servers can tell it apart from a client abort.
    """

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_DEADLINE = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """"stop" | "length" | "abort" for finished statuses, else None."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_DEADLINE: "abort",
}


class Request:
    """One generation request as the scheduler tracks it (one sequence; the engine fans out n > 1).

    Token layout and progress (num_computed_tokens = tokens whose KV is in the cache):

        all_token_ids:  [ prompt ............ | outputs ... ] [ spec_token_ids ]
                        |<-- num_computed -->|<- to compute ->|<- drafts ------>|
                                             num_tokens        num_tokens_with_spec

    With async scheduling the tokens being sampled by steps still on the GPU are not known yet:
    `num_output_placeholders` counts them (they sit past num_tokens; the scheduler schedules the
    next position as if they were there, and the model runner fills the input in on the device).

    Ordering: lower `priority` is more urgent (as in vLLM); within a priority the earliest deadline
    goes first (requests without a deadline after those with one), then the earliest arrival.
    `deadline` is absolute, on the scheduler's clock (time.monotonic by default).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
        deadline: float | None = None,
        extra_keys: ExtraKeys | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self._all_token_ids = list(self.prompt_token_ids)
        self.sampling_params = sampling_params
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.deadline = deadline
        self.extra_keys = extra_keys
        self.seq = next(_arrival_seq)
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        # Resolved by the scheduler at add time when sampling_params.max_tokens is None.
        self.max_tokens: int | None = sampling_params.max_tokens
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.spec_token_ids: list[int] = []
        self.num_output_placeholders = 0
        self.block_hashes: list[BlockHash] = []

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        return len(self._all_token_ids) + len(self.spec_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then outputs (a live list: do not mutate)."""
        return self._all_token_ids

    # -- state -------------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    @property
    def sort_key(self) -> tuple[int, float, float, int]:
        """Smaller = scheduled first and preempted last."""
        deadline = math.inf if self.deadline is None else self.deadline
        return (self.priority, deadline, self.arrival_time, self.seq)

    def append_output_token_ids(self, token_ids: int | Sequence[int]) -> None:
        if isinstance(token_ids, int):
            token_ids = (token_ids,)
        self.output_token_ids.extend(token_ids)
        self._all_token_ids.extend(token_ids)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
            f"output={self.num_output_tokens}, computed={self.num_computed_tokens}, prio={self.priority})"
        )
