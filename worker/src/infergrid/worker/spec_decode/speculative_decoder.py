"""SpeculativeDecoder: speculative decoding for the rank-0 runner (proposers, verifier, guard).

The executor builds it around the rank-0 ModelRunner and hands it to the runner as its `Speculator`
(runner/speculator.py: fill_drafts, verify, propose_ahead, remove_requests); the engine gets it from
the executor and calls `propose` after each step. The runner never imports this package.

Per engine step (continuous batching; any mix of requests with and without drafts, prefill chunks,
preempted and prefix-hit requests):

    schedule()        requests carry the drafts proposed last step (Request.spec_token_ids); the
                      scheduler budgets 1 + len(drafts) tokens for each and trims drafts to fit
    execute_model()   one target forward pass; a request with drafts samples at every draft
                      position + 1; `verify` = lossless rejection sampling (sample/rejection_sampler.py);
                      then `propose_ahead`: the proposer's `launch_ahead` (the draft model queues
                      the next drafts of requests without penalties or a seed behind it, for any
                      number of accepted drafts: ahead_proposer.py)
    update_from_output()  appends accepted drafts + one token and rewinds the rejected drafts' KV
    propose()         notes each verification's acceptance and asks the proposer (proposer.py: n-gram
                      lookup or the draft model) for k drafts for every running request that sampled, unless the guard
                      (guard.py) holds it back: the step's batch is over the cutoff, or the request
                      is cooling down after poor acceptance

The proposals (and, for a sampled draft, their distributions q) wait for the next step. While no
request will want drafts (`is_quiet`) the engine pipelines its steps (LLMEngine, async scheduling).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from infergrid.worker.engine.request import RequestStatus
from infergrid.worker.engine.scheduler_output import DRAFT_PLACEHOLDER_ID, ScheduledRequest, SchedulerOutput
from infergrid.worker.sample.rejection_sampler import NO_DRAFT, RejectionSampler, keep_accepted_prefix
from infergrid.worker.sample.sampler import SamplerOutput, SamplingMetadata
from infergrid.worker.spec_decode.draft_proposer import DraftProposer
from infergrid.worker.spec_decode.guard import SpeculationGuard
from infergrid.worker.spec_decode.ngram_proposer import NgramProposer
from infergrid.worker.spec_decode.proposer import Proposer

if TYPE_CHECKING:
    from infergrid.worker.engine.request import Request
    from infergrid.worker.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class SpeculativeDecoder:
    """Owns the proposer, the guard and the verifier for one ModelRunner (rank 0)."""

    def __init__(self, runner: ModelRunner) -> None:
        config = runner.config
        self.method = config.speculative_method
        self.max_k = config.num_speculative_tokens
        self._to_device = runner.to_device
        self.rejection_sampler = RejectionSampler(runner.sampler)
        self.proposer: Proposer
        if self.method == "ngram":
            self.proposer = NgramProposer()
        elif self.method == "draft":
            self.proposer = DraftProposer(config, runner)
        else:
            raise ValueError(f"speculative_method must be 'ngram' or 'draft', got {self.method!r}")
        self.guard = SpeculationGuard(config.speculative_disable_by_batch_size)
        # Requests given drafts that have not sampled since (a superset of those with drafts to verify).
        self.drafted: set[str] = set()
        logger.info("speculative decoding: %s, %d tokens per step, off above %d requests sampling per step",
                    self.method, self.max_k, self.guard.disable_by_batch_size)

    @property
    def num_steps(self) -> int:
        """propose() calls so far (the guard's clock)."""
        return self.guard.step

    def _upload(self, values: list[int]) -> torch.Tensor:
        """A small host list -> int64 device tensor, without waiting for the device."""
        return self._to_device(torch.tensor(values, dtype=torch.int64))

    # -- memory ------------------------------------------------------------------------------------
    def extra_kv_block_bytes(self) -> int:
        """KV bytes per block beyond the target's (the draft model's pool mirrors the target's)."""
        return self.proposer.kv_block_bytes()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.proposer.initialize_kv_cache(num_blocks)

    def remove_requests(self, request_ids: set[str]) -> None:
        for req_id in request_ids:
            self.guard.remove(req_id)
            self.drafted.discard(req_id)
        self.proposer.remove_requests(request_ids)

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
        batch = self.proposer.device_drafts
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
        batch = self.proposer.device_drafts
        if batch is None:
            raise RuntimeError("input ids with drafts on the device, but no proposal")
        src = [batch.source_index(r, int(j)) for r, j in zip(request_ids, draft_indices.tolist(), strict=True)]
        uploaded = self._upload(positions.tolist() + src)
        input_ids[uploaded[: len(src)]] = batch.tokens.view(-1)[uploaded[len(src) :]]

    # -- proposing ---------------------------------------------------------------------------------
    def propose_ahead(self, rows: Sequence[Any], sampled: torch.Tensor) -> None:
        """Right after a verification is launched (rows and sampled tokens as in `verify`): a proposer
        that can queues the next drafts behind it (the draft model: draft_proposer.py)."""
        self.proposer.launch_ahead(rows, sampled)

    def is_quiet(self) -> bool:
        """True when no request will propose drafts at the next two proposal steps (guard.py): the
        engine may pipeline the step it is about to schedule."""
        return not self.drafted and self.guard.is_quiet

    def propose(
        self, scheduler_output: SchedulerOutput, sampled_token_ids: Mapping[str, Sequence[int]],
        pipelined: bool = False,
    ) -> dict[str, list[int]]:
        """After the scheduler applied this step (run `pipelined` ahead of its tokens or not): note the
        verified drafts and propose k drafts for every running request that sampled and that the guard
        lets speculate. Returns request id -> drafts (none after a pipelined step: the next step is
        already running; a request that wanted drafts then gets them after the next synchronous step,
        which its wanting makes the engine run)."""
        self.proposer.note_step(scheduler_output)
        guard = self.guard
        sampling: list[ScheduledRequest] = []
        for sched in scheduler_output.scheduled:
            req_id = sched.request_id
            if not sched.needs_sample or req_id not in sampled_token_ids:
                continue
            self.drafted.discard(req_id)
            if sched.spec_token_ids:
                guard.observe(req_id, len(sampled_token_ids[req_id]) - 1)
            if sched.request.status == RequestStatus.RUNNING:
                sampling.append(sched)
        guard.begin_step(len(sampling))
        wanted: list[tuple[ScheduledRequest, int]] = []
        for sched in sampling:
            request = sched.request
            if guard.wants_drafts(sched.request_id, _own_clock(request)):
                # Drafts past prompt + max_tokens - 1 positions would be trimmed by the scheduler anyway.
                k = min(self.max_k, request.max_tokens - request.num_output_tokens - 1)  # type: ignore[operator]
                if k > 0:
                    wanted.append((sched, k))
        drafts: dict[str, list[int]] = {}
        if wanted and pipelined:
            seeded = [s.request_id for s, _ in wanted if _own_clock(s.request)]
            if seeded:  # (guard.is_quiet is exact for them: a bug, not a timing)
                raise RuntimeError(f"seeded sampled requests {seeded[:3]} want drafts after a pipelined step")
        elif wanted:
            drafts = self.proposer.propose_drafts(wanted, self.drafted)
            for sched, _ in wanted:  # (a lookup that found nothing: a verification with none accepted)
                if sched.request_id not in drafts:
                    guard.observe(sched.request_id, 0)
            self.drafted.update(drafts)
        guard.end_step()
        return drafts

    def describe(self) -> str:
        """The guard's state (for benchmarks and debugging)."""
        proposer = self.proposer
        caught_up = (f", draft caught up {proposer.num_catch_up_tokens_total} tokens, "
                     f"{proposer.num_ahead_proposals_total} proposed ahead" if isinstance(proposer, DraftProposer) else "")
        return f"k = {self.max_k}, {self.guard.describe()}, {len(self.drafted)} drafted{caught_up}"


def _own_clock(request: Request) -> bool:
    """A seeded sampled request: its random draws follow its drafts, so the guard decides them on the
    request's own clock, apart from the batch (guard.py)."""
    return request.sampling_params.seed is not None and not request.sampling_params.is_greedy
