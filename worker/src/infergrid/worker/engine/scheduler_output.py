"""What the scheduler hands the runner each step: SchedulerOutput (the batch) of ScheduledRequests.

Pure data (no scheduling logic), so that the runner and the speculative decoder depend on this
module, not on the scheduler (as vLLM v1's core/sched/output.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infergrid.worker.engine.request import Request

# Input token of a position whose token the previous step is still sampling (async scheduling).
PLACEHOLDER_TOKEN_ID = -1
# A draft the draft model proposed and left on the device: the model runner fills it in there.
DRAFT_PLACEHOLDER_ID = -2


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step.

    The runner feeds `token_ids` (where PLACEHOLDER_TOKEN_ID: the token the request samples in the
    previous step) at positions num_computed_tokens .. num_computed_tokens + num_new_tokens - 1,
    writing their KV into the slots given by `block_ids` (the whole block table; a live list owned
    by the KV cache manager, valid until the next schedule(): do not mutate). When `needs_sample`,
    it samples at the last 1 + len(spec_token_ids) positions (drafts verified + a bonus token);
    otherwise this is a partial prefill chunk and nothing is sampled.
    """

    request: Request
    num_computed_tokens: int
    num_new_tokens: int
    token_ids: list[int]
    spec_token_ids: list[int]
    block_ids: list[int]
    is_prefill: bool
    needs_sample: bool

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class SchedulerOutput:
    """The batch of one step, in batch order (running requests first, then newly admitted ones)."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted_req_ids: list[str] = field(default_factory=list)
    # Requests this call finished because their deadline passed while waiting (emit their outputs).
    expired_requests: list[Request] = field(default_factory=list)
    # Every request finished since the previous schedule() (the runner drops any per-request state).
    finished_req_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
