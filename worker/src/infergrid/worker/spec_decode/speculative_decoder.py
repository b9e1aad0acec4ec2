"""SpeculativeDecoder: speculative decoding for the rank-0 runner (proposers, verifier, adaptive k).

The executor builds it around the rank-0 ModelRunner and hands it to the runner as its `Speculator`
(runner/speculator.py: fill_drafts, verify, propose_ahead, remove_requests); the engine gets it from
the executor and calls `propose` after each step. The runner never imports this package.

Per engine step (continuous batching; any mix of requests with and without drafts, prefill chunks,
preempted and prefix-hit requests):

    schedule()        requests carry the drafts proposed last step (Request.spec_token_ids); the
                      scheduler budgets 1 + len(drafts) tokens for each and trims drafts to fit
    execute_model()   one target forward pass; a request with drafts samples at every draft
                      position + 1; `verify` = lossless rejection sampling (sample/rejection_sampler.py);
                      then `propose_ahead`: the draft model's next drafts (requests without
                      penalties or a seed), queued behind it for any number of accepted drafts
                      (ahead_proposer.py)
    update_from_output()  appends accepted drafts + one token and rewinds the rejected drafts' KV
    propose()         observes acceptance (adaptive.py) and the step's time (cost_model.py), runs
                      the hindsight checks due for requests that are off, then proposes up to k
                      tokens for every request that sampled and speculates (n-gram lookup or the
                      draft model), if the step as a whole pays (`_pays`) and speculation has
                      not delivered less than pipelined steps at this batch size (goodput_guard.py)

The proposals (and, for a sampled draft, their distributions q) wait for the next step. A request
at k = 0 costs a dictionary lookup per step here: no lookup, no draft-model pass, no draft rows; a
step in which every request is off with no check due skips even that (AdaptiveNumDrafts.can_skip),
and the engine pipelines such steps (LLMEngine with async scheduling). Checks never make a step
synchronous: the n-gram one is a host lookup over tokens already known, the draft model's is one
catch-up pass queued on the device behind the running step, its scores read CHECK_RESULT_DELAY
steps later.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from infergrid.worker import envs
from infergrid.worker.engine.request import RequestStatus
from infergrid.worker.engine.scheduler import DRAFT_PLACEHOLDER_ID, ScheduledRequest, SchedulerOutput
from infergrid.worker.sample.rejection_sampler import NO_DRAFT, RejectionSampler, keep_accepted_prefix
from infergrid.worker.sample.sampler import SamplerOutput, SamplingMetadata
from infergrid.worker.spec_decode.adaptive import (
    CHECK,
    MAX_BACKOFF,
    MIN_BACKOFF,
    NEW_OFF_WAIT,
    AdaptiveNumDrafts,
    best_num_drafts,
    expected_tokens,
)
from infergrid.worker.spec_decode.cost_model import (
    DEFAULT_FIXED_COST_TOKENS,
    GPU_DRAFT_HOST_COST,
    GPU_FIXED_COST_TOKENS,
    StepCostModel,
)
from infergrid.worker.spec_decode.draft_batch import AheadDrafts, AheadRequest, DraftBatch, DraftRequest
from infergrid.worker.spec_decode.draft_proposer import DraftProposer, PendingCheck
from infergrid.worker.spec_decode.goodput_guard import GoodputGuard
from infergrid.worker.spec_decode.ngram_proposer import NgramProposer

if TYPE_CHECKING:
    from infergrid.worker.engine.request import Request
    from infergrid.worker.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

HINDSIGHT_WINDOW = 8  # emitted tokens a hindsight check scores (at most)
CHECK_RESULT_DELAY = 2  # steps until a draft-model check's scores are applied (the device is past them)


class SpeculativeDecoder:
    """Owns the proposer, the per-request adaptive k and the verifier for one ModelRunner (rank 0)."""

    def __init__(self, runner: ModelRunner) -> None:
        config = runner.config
        self.method = config.speculative_method
        self.max_k = config.num_speculative_tokens
        self._to_device = runner.to_device
        self.rejection_sampler = RejectionSampler(runner.sampler)
        self.ngram: NgramProposer | None = None
        self.draft: DraftProposer | None = None
        if self.method == "ngram":
            self.ngram = NgramProposer()
            proposer_cost = 0.0
        elif self.method == "draft":
            self.draft = DraftProposer(config, runner)
            proposer_cost = self.draft.cost_ratio  # on a CPU the host computes the passes
            if runner.device.type == "cuda":
                proposer_cost = min(proposer_cost, GPU_DRAFT_HOST_COST)
        else:
            raise ValueError(f"speculative_method must be 'ngram' or 'draft', got {self.method!r}")
        on_gpu = runner.device.type == "cuda"
        self.cost = StepCostModel(proposer_cost, GPU_FIXED_COST_TOKENS if on_gpu else DEFAULT_FIXED_COST_TOKENS)
        self.guard = GoodputGuard()  # what speculating steps delivered against pipelined ones, measured
        # n-gram checks are host lookups: a new request that starts off is checked as soon as any other.
        # A draft model's checks cost an eager catch-up pass: while it keeps failing, new requests wait longest.
        self.adaptive = AdaptiveNumDrafts(self.max_k, enabled=envs.spec_decode_adaptive(),
                                          new_off_wait=NEW_OFF_WAIT if self.draft is not None else MIN_BACKOFF,
                                          failing_off_wait=MAX_BACKOFF if self.draft is not None else None)
        # Draft method: the last proposal step's drafts, on the device (requests' spec_token_ids hold
        # DRAFT_PLACEHOLDER_ID for them) and, for sampled requests, their distributions q.
        self.draft_batch: DraftBatch | None = None
        # NOTE: with tensor parallelism the other ranks take each step's input ids from rank 0's step
        # header, so the drafts (the draft model runs unsharded, on rank 0 only) go to the host.
        self.drafts_on_host = runner.tp_size > 1
        # Draft method: drafts proposed ahead of the verification running now (propose_ahead).
        self.ahead: AheadDrafts | None = None
        self._ahead_seconds = 0.0  # host time propose_ahead took (the proposer's, within the step)
        # Draft-model hindsight checks on their way: (step to apply at, scores, their requests).
        self._pending_checks: list[tuple[int, PendingCheck, dict[str, Request]]] = []
        self.num_ahead_proposals_total = 0  # requests whose drafts were proposed ahead (draft model)
        self.num_checks_total = 0  # hindsight checks of requests that were off
        self.num_batch_offs_total = 0  # steps whose drafters the batch-level check switched off
        self.num_steps = 0  # propose() calls: the step count adaptive k aligns checks to
        self._catch_up_seen = 0  # the draft's catch-up token count at the previous propose() call
        # Requests given drafts that have not sampled since (a superset of those with drafts to verify).
        self.drafted: set[str] = set()
        logger.info("speculative decoding: %s, up to %d tokens per step (proposer cost %.3f per token, adaptive %s)",
                    self.method, self.max_k, proposer_cost, self.adaptive.enabled)

    def _upload(self, values: list[int]) -> torch.Tensor:
        """A small host list -> int64 device tensor, without waiting for the device."""
        return self._to_device(torch.tensor(values, dtype=torch.int64))

    # -- memory ------------------------------------------------------------------------------------
    def extra_kv_block_bytes(self) -> int:
        """KV bytes per block beyond the target's (the draft model's pool mirrors the target's)."""
        return self.draft.kv_block_bytes() if self.draft is not None else 0

    def initialize_kv_cache(self, num_blocks: int) -> None:
        if self.draft is not None:
            self.draft.initialize_kv_cache(num_blocks)

    def remove_requests(self, request_ids: set[str]) -> None:
        for req_id in request_ids:
            self.adaptive.remove(req_id)
            self.drafted.discard(req_id)
            if self.ngram is not None:
                self.ngram.remove(req_id)
        if self.draft is not None:
            self.draft.remove_requests(request_ids)

    # -- verification ------------------------------------------------------------------------------
    def verify(self, logits: torch.Tensor, meta: SamplingMetadata, rows: Sequence[Any]) -> SamplerOutput:
        """Rejection-sample a batch whose rows (runner/sampling_metadata.py `SampleRow`s: `.sched`, `.draft_index`)
        include draft positions. A row's sampled token is -1 where its request does not get that far
        (a draft before it was rejected), else the token it emits."""
        host_ids: list[int] = []
        sources: list[int] = []  # index into the draft batch's tokens, -1 where host_ids has the draft
        segment_start: list[int] = []  # each row's request's first row
        prob_rows: list[int] = []
        probs: list[torch.Tensor] = []
        batch = self.draft_batch
        for i, row in enumerate(rows):
            spec = row.sched.spec_token_ids
            j = row.draft_index
            segment_start.append(i - j)
            draft = spec[j] if j < len(spec) else NO_DRAFT
            on_device = draft == DRAFT_PLACEHOLDER_ID
            if on_device and (batch is None or row.sched.request_id not in batch.rows):
                raise RuntimeError(f"request {row.sched.request_id!r}: a draft on the device, but no proposal")
            host_ids.append(NO_DRAFT if on_device else draft)
            sources.append(batch.source_index(row.sched.request_id, j) if on_device else -1)  # type: ignore[union-attr]
            q = batch.probs.get(row.sched.request_id) if batch is not None and j < len(spec) else None
            if q is not None:
                prob_rows.append(i)
                probs.append(q[j])
        # One upload for the step's index lists (each upload costs ~10-20 us of host time on a GPU).
        n = len(rows)
        uploaded = self._upload(host_ids + sources + segment_start + prob_rows)
        draft_token_ids, src, starts = uploaded[:n], uploaded[n : 2 * n], uploaded[2 * n : 3 * n]
        on_device = batch is not None and any(s >= 0 for s in sources)
        max_query_len = max(row.draft_index for row in rows) + 1
        if meta.all_greedy:  # the drafts are only compared with the target's choices (below)
            out = self.rejection_sampler(logits, meta, draft_token_ids)
            out.sampled = keep_accepted_prefix(out.sampled, draft_token_ids, starts, max_query_len,
                                               src if on_device else None, batch.tokens if on_device else None)  # type: ignore[union-attr]
            return out
        if on_device:
            draft_token_ids = torch.where(src >= 0, batch.tokens.view(-1)[src.clamp(min=0)], draft_token_ids)  # type: ignore[union-attr]
        if not prob_rows:
            out = self.rejection_sampler(logits, meta, draft_token_ids)
        else:
            out = self.rejection_sampler(logits, meta, draft_token_ids, uploaded[3 * n :], torch.stack(probs))
        # A row is emitted when no row of its request before it was rejected (sampled != draft).
        out.sampled = keep_accepted_prefix(out.sampled, draft_token_ids, starts, max_query_len)
        return out

    def fill_drafts(self, input_ids: torch.Tensor, positions: np.ndarray, request_ids: list[str],
                    draft_indices: np.ndarray) -> None:
        """The target's input ids at `positions` are DRAFT_PLACEHOLDER_IDs: set them, on the device,
        to draft `draft_indices[i]` of request `request_ids[i]` from the last proposal step."""
        batch = self.draft_batch
        if batch is None:
            raise RuntimeError("input ids with drafts on the device, but no proposal")
        src = [batch.source_index(r, int(j)) for r, j in zip(request_ids, draft_indices.tolist(), strict=True)]
        uploaded = self._upload(positions.tolist() + src)
        input_ids[uploaded[: len(src)]] = batch.tokens.view(-1)[uploaded[len(src) :]]

    # -- proposing ---------------------------------------------------------------------------------
    def propose_ahead(self, rows: Sequence[Any], sampled: torch.Tensor) -> None:
        """Right after a verification is launched (rows and sampled tokens as in `verify`): the draft
        model proposes the next drafts of its requests (no penalties, no seed) at once, queued behind
        it, for whatever number of drafts it accepts (DraftProposer.propose_ahead). `propose` then
        takes them for the requests that still want drafts, and the device runs the draft model
        while the host applies the step's result, instead of waiting for it."""
        self.ahead = None
        if self.draft is None:
            return
        start = time.perf_counter()
        requests = []
        for i, row in enumerate(rows):
            sched = row.sched
            params = sched.request.sampling_params
            # NOTE: not a seeded sampled request: its draft draws must not depend on whether the
            # drafts were proposed ahead (which depends on the batch: the catch-up budget).
            if (row.draft_index == 0 and sched.spec_token_ids and not params.has_penalties
                    and (params.is_greedy or params.seed is None)):
                requests.append(AheadRequest(sched.request, sched.block_ids, sched.num_computed_tokens,
                                             len(sched.spec_token_ids), i))
        if requests:
            self.ahead = self.draft.propose_ahead(requests, sampled)
            self._ahead_seconds = time.perf_counter() - start

    def observe_pipelined_step(self, scheduler_output: SchedulerOutput, seconds: float) -> None:
        """A pipelined step took `seconds` (from the previous step's finish to its own)."""
        if scheduler_output.num_batched_tokens == len(scheduler_output.scheduled):  # a decode step
            self.cost.observe_pipelined_step(scheduler_output.num_batched_tokens, seconds)

    def is_quiet(self) -> bool:
        """True when no request will propose drafts until some request is switched on (in a propose()
        call, which then gives its first drafts two steps later at the earliest after a pipelined
        step): the engine may pipeline the step it is about to schedule."""
        return not self.drafted and not self.adaptive.any_on

    def propose(
        self,
        scheduler_output: SchedulerOutput,
        sampled_token_ids: Mapping[str, Sequence[int]],
        step_seconds: float | None = None,
        pipelined: bool = False,
        wall_seconds: float | None = None,
        gap_seconds: float | None = None,
    ) -> dict[str, list[int]]:
        """After the scheduler applied this step (which took `step_seconds`, proposing excluded; it
        ran `pipelined` ahead of its tokens or not; `wall_seconds`: finish to finish, after a synchronous
        step, else None; `gap_seconds`: finish to finish after a step of either kind): learn from the
        verified drafts and the hindsight
        checks, run the checks now due, and propose the next drafts for every running request that
        sampled and speculates, if the step as a whole pays. Returns request id -> drafts (none after
        a pipelined step: the next step is already running)."""
        ahead, self.ahead = self.ahead, None
        # The drafts proposed ahead were the proposer's work inside this step: its time is the proposer's.
        ahead_seconds, self._ahead_seconds = self._ahead_seconds, 0.0
        if step_seconds is not None:
            step_seconds = max(0.0, step_seconds - ahead_seconds)
        if self.draft is not None:
            self.draft.note_target_writes(scheduler_output)
        num_sampled = len(sampled_token_ids)
        # Decode steps only (every request samples, at most 1 + k tokens each): prefill is another regime.
        is_decode = (num_sampled == len(scheduler_output.scheduled)
                     and scheduler_output.num_batched_tokens <= num_sampled * (1 + self.max_k))
        num_emitted = sum(map(len, sampled_token_ids.values()))
        if gap_seconds is not None and is_decode and num_sampled:  # switching steps included (goodput_guard.py)
            self.guard.observe(num_sampled, pipelined, num_emitted, gap_seconds, self.num_steps)
        if self.draft is not None:
            # A step whose device work included draft catch-ups beyond a step's worth (a request's first
            # proposal after a switch-on, a hindsight check) measures a transition, not the steady
            # state: kept out of the fit and the calibration, which would otherwise price speculation
            # by what switching it on and off costs, and switch it off more.
            total = self.draft.num_catch_up_tokens_total
            caught_up, self._catch_up_seen = total - self._catch_up_seen, total
            is_decode = is_decode and caught_up <= 2 * num_sampled * (self.max_k + 1)
        if step_seconds is not None and is_decode:
            self.cost.observe_step(scheduler_output.num_batched_tokens, step_seconds)
        # A synchronous step's realized cost (finish to finish) against what the batch-level check predicted.
        self.cost.observe_speculating_step(num_sampled, num_emitted, wall_seconds if is_decode else None)
        adaptive, step = self.adaptive, self.num_steps
        self.num_steps += 1
        now = not pipelined
        # Every request off, no check due or in flight: nothing to observe, nothing to propose.
        if not self.drafted and not self._pending_checks and adaptive.can_skip(step, sampled_token_ids.keys()):
            return {}
        # What a check's drafts must beat: 1 / rho, over kappa (how the predictions of speculating steps
        # at this size compared with what they delivered), as in the batch-level check.
        batch = max(1, num_sampled)
        cost, plain = self.cost.draft_token_cost(batch), self.cost.plain_goodput(batch) / self.cost.calibration(batch)
        blocked = self.guard.blocks(batch, step)
        if blocked:  # no check switches a request on (the batch-level check switches off those that are on)
            plain = math.inf
        # NOTE: a seeded sampled request's random draws depend on its drafts, so its drafts must not
        # depend on timing or on other requests: default costs, its own step count, no batch check.
        seeded_cost = self.cost.draft_token_cost(max(1, num_sampled), measured=False)

        def decide_args(request: Request) -> tuple[float, int | None, float]:
            """(c, step, what a check's drafts must beat alone: 1 / (rho * kappa))"""
            return (seeded_cost, None, 1.0) if _own_clock(request) else (cost, step, plain)

        self._collect_checks(step, decide_args, now)
        wanted: list[tuple[ScheduledRequest, int]] = []
        checks: list[ScheduledRequest] = []
        sampling: list[ScheduledRequest] = []
        for sched in scheduler_output.scheduled:
            req_id = sched.request_id
            if not sched.needs_sample or req_id not in sampled_token_ids:
                continue
            self.drafted.discard(req_id)
            if sched.spec_token_ids:
                adaptive.observe(req_id, len(sched.spec_token_ids), len(sampled_token_ids[req_id]) - 1)
            request = sched.request
            if request.status != RequestStatus.RUNNING:
                continue
            sampling.append(sched)
            c, own_step, _ = decide_args(request)
            # Marginal: in a synchronous step (the batch-level check below decides that) drafts need
            # only beat 1 token per step.
            k = adaptive.num_drafts(req_id, c, own_step, 1.0, now)
            if k == CHECK and blocked and own_step is not None:  # it could not switch on: not worth a lookup
                adaptive.observe_check(req_id, 0.0, 0, c, own_step, plain, now)
            elif k == CHECK:
                checks.append(sched)
            elif k:
                # Drafts past prompt + max_tokens - 1 positions would be trimmed by the scheduler anyway.
                k = min(k, request.max_tokens - request.num_output_tokens - 1)  # type: ignore[operator]
                if k > 0:
                    wanted.append((sched, k))
        if checks:
            self._check(checks, decide_args, step, now)
        if adaptive.any_on and not self._pays(sampling, dict((s.request_id, k) for s, k in wanted), cost, step,
                                              blocked):
            return {}
        if not wanted:
            self.cost.discard_prediction()
            return {}
        if pipelined:
            raise RuntimeError(f"requests {[s.request_id for s, _ in wanted][:3]} want drafts after a pipelined "
                               "step: adaptive k switched them on too early")
        start = time.perf_counter()
        drafts, num_caught_up = self._propose(wanted, ahead)
        if not drafts:  # the step runs without drafts: not the speculating step the check predicted
            self.cost.discard_prediction()
        for sched, _ in wanted:
            if sched.request_id not in drafts:  # nothing to propose (no n-gram match)
                adaptive.miss(sched.request_id)
        self.drafted.update(drafts)
        # Time per draft position, in steps that caught up no more than a step's worth of tokens
        # (a first proposal catches up on a whole prompt: not the per-step cost).
        if step_seconds is not None and num_caught_up <= len(wanted) * (self.max_k + 2):
            max_k = max(k for _, k in wanted)
            self.cost.observe_proposer((time.perf_counter() - start + ahead_seconds) / max_k, step_seconds)
        return drafts

    def describe(self) -> str:
        """The estimates behind the decisions (for benchmarks and debugging)."""
        caught_up = f", draft caught up {self.draft.num_catch_up_tokens_total} tokens" if self.draft else ""
        return (f"{self.cost.describe()}, {self.guard.describe(self.num_steps)}, "
                f"engine acceptance {self.adaptive.engine_rate():.2f}, "
                f"{len(self.drafted)} drafted, any on: {self.adaptive.any_on}, {self.num_checks_total} checks, "
                f"{self.num_batch_offs_total} batch-level switch-offs{caught_up}")

    def _pays(self, sampling: list[ScheduledRequest], wanted: dict[str, int], draft_cost: float, step: int,
              blocked: bool) -> bool:
        """The batch-level check, over the requests of this step that are on (`wanted`: those that
        propose now, with their k; the others just switched on, at their estimated k). A speculating
        step is synchronous for every request in it, so the drafters' expected extra tokens must beat
        the pipelining the whole batch gives up (cost_model.speculation_pays). If they do not, the
        drafters (those on the engine's clock) go off until their next hindsight check: this step
        and the next ones run pipelined, without drafts."""
        adaptive = self.adaptive
        if not adaptive.enabled:
            return True
        on: list[tuple[str, int, float]] = []  # request, k, expected extra tokens
        for sched in sampling:
            req_id = sched.request_id
            if not adaptive.is_on(req_id):
                continue
            if _own_clock(sched.request):  # synchronous anyway
                return True
            rate = adaptive.acceptance_rate(req_id)
            k = wanted.get(req_id) or best_num_drafts(rate, self.max_k, draft_cost)
            if k:
                on.append((req_id, k, expected_tokens(rate, k) - 1.0))
        if not on:
            return True
        extra = sum(gain for _, _, gain in on)
        if blocked:  # the goodput guard: speculation delivered less than pipelined steps at this size
            self.cost.discard_prediction()
        elif self.cost.speculation_pays(len(sampling), draft_cost, extra, sum(k for _, k, _ in on),
                                        max(k for _, k, _ in on)):
            return True
        logger.debug("step %d: speculation does not pay for the batch (%s)", step, self.describe())
        self.num_batch_offs_total += 1
        for req_id, _, _ in on:
            adaptive.switch_off(req_id, step)
        return False

    def _check(self, checks: list[ScheduledRequest], decide_args: Callable, step: int, now: bool) -> None:
        """Hindsight checks of off requests (adaptive.py): n-gram at once, the draft model queued."""
        self.num_checks_total += len(checks)
        if self.ngram is not None:
            for sched in checks:
                request = sched.request
                window = min(HINDSIGHT_WINDOW, request.num_output_tokens)
                matched = self.ngram.hindsight(request.all_token_ids, window, sched.request_id)
                self.adaptive.observe_check(sched.request_id, matched, window, *decide_args(request), now)
            return
        assert self.draft is not None
        from infergrid.worker.spec_decode.draft_proposer import DraftRequest

        pending = self.draft.look_back([(DraftRequest(s.request, s.block_ids, 0), HINDSIGHT_WINDOW) for s in checks])
        self._pending_checks.append((step + CHECK_RESULT_DELAY, pending, {s.request_id: s.request for s in checks}))

    def _collect_checks(self, step: int, decide_args: Callable, now: bool) -> None:
        """Apply the draft model's hindsight checks queued CHECK_RESULT_DELAY steps ago (the steps since
        waited for the device, so this does not; and a fixed delay keeps the decisions deterministic)."""
        while self._pending_checks and self._pending_checks[0][0] <= step:
            _, pending, requests = self._pending_checks.pop(0)
            for req_id, (matched, window) in pending.result().items():
                self.adaptive.observe_check(req_id, matched, window, *decide_args(requests[req_id]), now)

    def _propose(self, candidates: list[tuple[ScheduledRequest, int]],
                 ahead: AheadDrafts | None = None) -> tuple[dict[str, list[int]], int]:
        """Drafts for (request, k) pairs, and the tokens the draft model caught up on to make them
        (those proposed `ahead` are taken from there)."""
        if self.ngram is not None:
            drafts = {}
            for sched, k in candidates:
                tokens = self.ngram.propose(sched.request.all_token_ids, k, sched.request_id)
                if tokens:
                    drafts[sched.request_id] = tokens
            return drafts, 0
        assert self.draft is not None
        self._keep_unverified_drafts()
        num_caught_up = self.draft.num_catch_up_tokens_total
        requests = [DraftRequest(s.request, s.block_ids, k) for s, k in candidates]
        is_ready = [ahead is not None and ahead.matches(dr.request) for dr in requests]
        ready = [dr for dr, r in zip(requests, is_ready, strict=True) if r]
        rest = [dr for dr, r in zip(requests, is_ready, strict=True) if not r]
        batch = self.draft.propose(rest) if rest else None
        if ready:
            assert ahead is not None
            batch = self.draft.use_ahead(ahead, ready, batch)
            self.num_ahead_proposals_total += len(ready)
        self.draft_batch = batch
        caught_up = self.draft.num_catch_up_tokens_total - num_caught_up
        if batch is None:
            return {}, caught_up
        if self.drafts_on_host or any(s.request.sampling_params.reads_output_tokens for s, _ in candidates
                                      if s.request_id in batch.rows):
            # Wait for the drafts: other TP ranks read input ids from the step header, and penalties at
            # draft positions count the drafts before them (on the host), as grammar matchers advance
            # over them (structured output).
            return batch.to_host(), caught_up
        return {req_id: [DRAFT_PLACEHOLDER_ID] * n for req_id, n in batch.num_drafts.items()}, caught_up

    def _keep_unverified_drafts(self) -> None:
        """Requests still holding drafts of the batch about to be replaced (not scheduled since: a
        full token budget) get their values on the host (a wait, but a rare one)."""
        old = self.draft_batch
        if old is None:
            return
        stale = [req_id for req_id in self.drafted if req_id in old.rows]
        if not stale:
            return
        values = old.to_host()
        for req_id in stale:
            request = old.requests.get(req_id)
            if request is not None and DRAFT_PLACEHOLDER_ID in request.spec_token_ids:
                request.spec_token_ids = values[req_id][: len(request.spec_token_ids)]


def _own_clock(request: Request) -> bool:
    """A seeded sampled request decides on its own clock and default costs (see propose())."""
    return request.sampling_params.seed is not None and not request.sampling_params.is_greedy
