"""Scheduler: decides, each step, which requests run and how many tokens each computes.

One token-budget path (vLLM v1 style): every request's computed tokens catch up with its known
tokens (+ speculative drafts) within a per-step budget. A decode is "1 new token", a prefill chunk
is "min(uncomputed prompt, budget)", a prefix-cache hit just starts num_computed_tokens higher, and
draft tokens are extra tokens past the end. No tensors here: the model runner turns the returned
SchedulerOutput into inputs and reports sampled token ids back through `update_from_output`.

    schedule():  expire waiting requests past their deadline
                 RUNNING (priority order): allocate slots; if the pool is full preempt the least
                        urgent running request (free its blocks, recompute later) and retry
                 WAITING (priority, deadline, arrival order), unless something was preempted:
                        first the mostly-cached requests of the head's priority whose rest fits
                        (prefix-cache hits are not held back behind unique prefills), then in order:
                        prefix-cache lookup -> allocate -> RUNNING; stop at the first that does not fit
                 then advance every scheduled request's num_computed_tokens (its KV is on its way)
    update_from_output(): append sampled tokens (rewind rejected drafts), check stop/length,
                 cache newly full blocks, free finished requests

Async scheduling (engine/llm_engine.py): step N+1 is scheduled while step N still runs, before its
tokens are known. A request that samples in step N gets an output placeholder at schedule time;
step N+1 then decodes the placeholder's position with PLACEHOLDER_TOKEN_ID as its input token (the
model runner takes the real one from step N's sampled tokens on the device), and
update_from_output(step N) swaps the placeholder for the token. A request finished by step N's token
(EOS, stop string) wastes its slot in step N+1, whose result for it is dropped.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from infergrid.worker.config import EngineConfig
from infergrid.worker.engine.kv_cache_manager import KVCacheManager, cdiv
from infergrid.worker.engine.request import Request, RequestStatus
from infergrid.worker.engine.scheduler_output import (
    PLACEHOLDER_TOKEN_ID,
    ScheduledRequest,
    SchedulerOutput,
)
from infergrid.worker.engine.stats import EngineStats

# Waiting requests looked at for prefix-cache hits each step (Scheduler._admit_cache_hits).
HIT_SCAN_LIMIT = 256


class Scheduler:
    """Continuous batching over a paged KV cache with priorities, deadlines and preemption by recompute.

    Args:
        config: engine config (block_size, max_num_seqs, token budget, prefix caching).
        num_blocks: KV blocks in the pool, the null block 0 included.
        max_model_len: the resolved context length.
        eos_token_ids: the model's EOS ids; end a request unless its params say ignore_eos.
        clock: monotonic seconds; request deadlines are on this clock.

    Usage per step: `out = schedule()`; run the model; `update_from_output(out, sampled)`;
    optionally `update_draft_token_ids(drafts)` for speculative decoding. Stop strings are the
    detokenizer's job: it calls `finish_requests(ids, RequestStatus.FINISHED_STOPPED)`.
    NOTE: not thread-safe; only the engine loop calls it (aborts are queued to that loop).
    """

    def __init__(
        self,
        config: EngineConfig,
        num_blocks: int,
        max_model_len: int,
        eos_token_ids: Iterable[int] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.get_max_num_batched_tokens()
        self.eos_token_ids = frozenset(eos_token_ids)
        self.async_scheduling = config.async_scheduling
        self.clock = clock
        self.kv_cache_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # sorted by Request.sort_key
        self.running: list[Request] = []
        self._finished_req_ids: set[str] = set()
        self.num_preemptions_total = 0
        self.spec_decode_num_drafts_total = 0
        self.spec_decode_num_draft_tokens_total = 0
        self.spec_decode_num_accepted_tokens_total = 0
        self.spec_decode_num_accepted_tokens_per_pos = [0] * config.num_speculative_tokens

    # -- admission ---------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request; raises ValueError (with the reason) if it could never run."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        request.max_tokens = self._resolve_max_tokens(request)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=_sort_key)

    def _resolve_max_tokens(self, request: Request) -> int:
        num_prompt, limit = request.num_prompt_tokens, self.max_model_len
        # The last sampled token's KV is never written, so a request of n tokens holds n - 1 slots.
        capacity = self.kv_cache_manager.num_usable_blocks * self.block_size + 1
        if num_prompt == 0:
            raise ValueError("prompt must contain at least one token")
        max_tokens = request.max_tokens
        if max_tokens is None:
            if num_prompt >= min(limit, capacity):
                raise ValueError(
                    f"prompt has {num_prompt} tokens, which leaves no room for output within "
                    f"max_model_len {limit} and the KV cache's {capacity - 1} token slots"
                )
            return min(limit, capacity) - num_prompt
        if num_prompt + max_tokens > limit:
            raise ValueError(
                f"this model's maximum context length is {limit} tokens, but the request needs "
                f"{num_prompt + max_tokens} ({num_prompt} in the prompt, {max_tokens} for max_tokens)"
            )
        num_blocks = cdiv(num_prompt + max_tokens - 1, self.block_size)
        if num_blocks > self.kv_cache_manager.num_usable_blocks:
            raise ValueError(
                f"the request needs {num_blocks} KV cache blocks ({num_prompt} prompt + {max_tokens} "
                f"max_tokens) but the whole KV cache has {self.kv_cache_manager.num_usable_blocks}"
            )
        return max_tokens

    # -- one step ----------------------------------------------------------------------------------
    def schedule(self, pipelined: bool | None = None) -> SchedulerOutput:
        """Pick this step's batch within the token budget and max_num_seqs. `pipelined` (default:
        async_scheduling): the next step may be scheduled before this one's tokens are known, so its
        sampling requests get output placeholders."""
        pipelined = self.async_scheduling if pipelined is None else pipelined
        out = SchedulerOutput(finished_req_ids=self._finished_req_ids)
        self._finished_req_ids = set()
        out.expired_requests = self._expire_deadlines()
        budget = self.max_num_batched_tokens

        self.running.sort(key=_sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._num_new_tokens(request, budget)
            if num_new <= 0:
                i += 1
                continue
            while self.kv_cache_manager.allocate_slots(request, num_new) is None:
                victim = self.running.pop()  # the least urgent; never one already scheduled
                self._preempt(victim)
                out.preempted_req_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                out.scheduled.append(self._make_scheduled(request, num_new))
                budget -= num_new
                i += 1

        can_admit = not out.preempted_req_ids  # admitting now would only thrash
        if can_admit and self.waiting and self.kv_cache_manager.enable_prefix_caching:
            budget = self._admit_cache_hits(out, budget)
        while can_admit and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            hit_blocks, num_hit = self.kv_cache_manager.get_computed_blocks(request)
            num_new = min(request.num_tokens + request.num_output_placeholders - num_hit, budget)
            if not self._admit(out, request, hit_blocks, num_hit, num_new):
                break  # strict order: nothing behind the head jumps the queue
            budget -= num_new

        out.num_batched_tokens = self.max_num_batched_tokens - budget
        for sched in out.scheduled:  # their KV is written by this step (rejected drafts are rewound later)
            sched.request.num_computed_tokens += sched.num_new_tokens
            if pipelined and sched.needs_sample:
                sched.request.num_output_placeholders += 1
        return out

    def _admit_cache_hits(self, out: SchedulerOutput, budget: int) -> int:
        """Admit, ahead of the queue, the waiting requests of the head's priority that are mostly
        cached: at least half their prompt is a prefix-cache hit and the rest fits in this step's
        budget whole, so they sample this step. A hit costs a step little (its uncached tail), while
        the unique prompts ahead of it would hold it back for whole prefills; the requests it passes
        wait for those few tokens only. Looks at the first HIT_SCAN_LIMIT waiting requests (a lookup
        each, every step, while they wait). Returns the budget left."""
        head_priority = self.waiting[0].priority
        for request in self.waiting[:HIT_SCAN_LIMIT]:
            if budget <= 0 or len(self.running) >= self.max_num_seqs or request.priority != head_priority:
                break
            hit_blocks, num_hit = self.kv_cache_manager.get_computed_blocks(request)
            num_new = request.num_tokens + request.num_output_placeholders - num_hit
            if num_hit == 0 or num_hit < num_new or num_new > budget:
                continue
            if not self._admit(out, request, hit_blocks, num_hit, num_new):
                break  # the pool is full: the strict pass below will not admit either
            budget -= num_new
        return budget

    def _admit(self, out: SchedulerOutput, request: Request, hit_blocks: list, num_hit: int, num_new: int) -> bool:
        """Move a waiting request to running with `num_new` tokens this step; False if the pool is full."""
        if self.kv_cache_manager.allocate_slots(request, num_new, hit_blocks) is None:
            return False
        self.waiting.remove(request)
        self.kv_cache_manager.record_prefix_lookup(request.num_tokens, num_hit)
        request.num_computed_tokens = num_hit
        if request.num_preemptions == 0:
            request.num_cached_tokens = num_hit
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        out.scheduled.append(self._make_scheduled(request, num_new))
        return True

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        num_new = request.num_tokens_with_spec + request.num_output_placeholders - request.num_computed_tokens
        # Never write KV past prompt + max_tokens - 1 positions (drafts are trimmed to fit).
        max_positions = request.num_prompt_tokens + request.max_tokens - 1  # type: ignore[operator]
        return min(num_new, budget, max_positions - request.num_computed_tokens)

    def _make_scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        start, end = request.num_computed_tokens, request.num_computed_tokens + num_new
        num_known = min(end, request.num_tokens)
        num_tokens = request.num_tokens + request.num_output_placeholders  # (async: with unknown ones)
        if request.num_output_placeholders:  # (never together with drafts)
            token_ids = request.all_token_ids[start:num_known] + [PLACEHOLDER_TOKEN_ID] * (end - num_known)
            spec = []
        else:
            spec = request.spec_token_ids[: end - num_known]
            token_ids = request.all_token_ids[start:num_known] + spec
        return ScheduledRequest(
            request=request,
            num_computed_tokens=start,
            num_new_tokens=num_new,
            token_ids=token_ids,
            spec_token_ids=spec,
            block_ids=self.kv_cache_manager.get_block_ids(request),
            is_prefill=start + 1 < num_tokens,
            needs_sample=end >= num_tokens,
        )

    def _preempt(self, request: Request) -> None:
        """Preemption by recompute: drop the KV, requeue at the original priority and arrival."""
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        bisect.insort(self.waiting, request, key=_sort_key)

    def _expire_deadlines(self) -> list[Request]:
        now = self.clock()
        expired = [r for r in self.waiting if r.deadline is not None and r.deadline <= now]
        for request in expired:
            request.stop_reason = "deadline"
        return self.finish_requests([r.request_id for r in expired], RequestStatus.FINISHED_DEADLINE)

    # -- results -----------------------------------------------------------------------------------
    def update_from_output(
        self, scheduler_output: SchedulerOutput, sampled_token_ids: Mapping[str, Sequence[int]]
    ) -> list[Request]:
        """Apply one step's results; returns the requests that finished (their blocks are freed).

        `sampled_token_ids[req_id]` holds the tokens sampled for requests with `needs_sample`:
        one token, or with drafts the accepted drafts plus one bonus token. Rejected drafts' KV
        slots are rewound (num_computed_tokens drops) and simply overwritten by later steps.
        With async scheduling the next step may already be scheduled (and a request of this one
        preempted by it): this step's placeholders become tokens.
        """
        finished = []
        for sched in scheduler_output.scheduled:
            request = sched.request
            if request.is_finished:  # aborted or stopped while the step ran
                continue
            request.spec_token_ids = []
            new_token_ids = list(sampled_token_ids.get(request.request_id, ())) if sched.needs_sample else []
            if sched.needs_sample and request.num_output_placeholders:
                request.num_output_placeholders -= 1
            if sched.spec_token_ids:
                self._rewind_rejected(request, sched, new_token_ids)
            for token_id in new_token_ids:
                request.append_output_token_ids(token_id)
                if self._check_stop(request, token_id):
                    break
            # Invariant for a live request: the last known (or still unknown) token has to be computed.
            request.num_computed_tokens = min(request.num_computed_tokens,
                                              request.num_tokens + request.num_output_placeholders - 1)
            self.kv_cache_manager.cache_computed_blocks(request)
            if request.is_finished:
                self._dequeue(request)
                self._free(request)
                finished.append(request)
        return finished

    def _rewind_rejected(self, request: Request, sched: ScheduledRequest, new_token_ids: list[int]) -> None:
        num_drafts = len(sched.spec_token_ids)
        num_accepted = max(0, len(new_token_ids) - 1)
        if num_accepted > num_drafts:
            raise ValueError(
                f"request {request.request_id!r}: {len(new_token_ids)} tokens for {num_drafts} drafts"
            )
        request.num_computed_tokens -= num_drafts - num_accepted
        self.spec_decode_num_drafts_total += 1
        self.spec_decode_num_draft_tokens_total += num_drafts
        self.spec_decode_num_accepted_tokens_total += num_accepted
        per_pos = self.spec_decode_num_accepted_tokens_per_pos
        if len(per_pos) < num_accepted:
            per_pos.extend([0] * (num_accepted - len(per_pos)))
        for i in range(num_accepted):
            per_pos[i] += 1

    def _check_stop(self, request: Request, token_id: int) -> bool:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token_id in self.eos_token_ids and not params.ignore_eos:
                request.status = RequestStatus.FINISHED_STOPPED
                return True
            if params.stop_token_ids and token_id in params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token_id
                return True
        max_tokens: int = request.max_tokens  # type: ignore[assignment]  # resolved at add time
        if request.num_output_tokens >= max_tokens or request.num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def update_draft_token_ids(self, draft_token_ids: Mapping[str, Sequence[int]]) -> None:
        """Attach speculative drafts (after update_from_output) to be verified next step."""
        for req_id, drafts in draft_token_ids.items():
            request = self.requests.get(req_id)
            # (none after a token still unknown: the drafts would not continue it)
            if request is not None and request.status == RequestStatus.RUNNING and not request.num_output_placeholders:
                request.spec_token_ids = list(drafts)

    # -- finishing from outside --------------------------------------------------------------------
    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish unfinished requests (abort, stop string, deadline) and free their blocks at once."""
        if not status.is_finished:
            raise ValueError(f"status must be a finished status, got {status.name}")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        finished = []
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            self._dequeue(request)
            request.status = status
            self._free(request)
            finished.append(request)
        return finished

    def _dequeue(self, request: Request) -> None:
        """Take a request out of the running or the waiting queue, whichever holds it."""
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)

    def abort_requests(self, request_ids: str | Iterable[str]) -> list[Request]:
        """Abort requests (unknown or finished ids are ignored); their KV blocks are freed at once."""
        return self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def _free(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self._finished_req_ids.add(request.request_id)

    # -- introspection -----------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def make_stats(self) -> EngineStats:
        """The stats the scheduler keeps (the engine adds its token and step counters)."""
        kv = self.kv_cache_manager
        total = kv.num_usable_blocks
        return EngineStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=kv.get_usage(),
            num_total_blocks=total,
            num_used_blocks=total - kv.pool.get_num_free_blocks(),
            num_preemptions_total=self.num_preemptions_total,
            prefix_cache_queries_total=kv.prefix_cache_queries,
            prefix_cache_hits_total=kv.prefix_cache_hits,
            prefix_cache_evicted_blocks_total=kv.pool.num_evicted_blocks,
            spec_decode_num_drafts_total=self.spec_decode_num_drafts_total,
            spec_decode_num_draft_tokens_total=self.spec_decode_num_draft_tokens_total,
            spec_decode_num_accepted_tokens_total=self.spec_decode_num_accepted_tokens_total,
            spec_decode_num_accepted_tokens_per_pos=tuple(self.spec_decode_num_accepted_tokens_per_pos),
        )


def _sort_key(request: Request) -> tuple[int, float, float, int]:
    return request.sort_key
