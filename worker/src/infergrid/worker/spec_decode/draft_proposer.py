"""Draft-model proposer: a smaller checkpoint with the target's tokenizer proposes k tokens per step.

    draft_model.py     the draft checkpoint on a ModelRunner of its own (public methods only); its KV
                       pool mirrors the target's block ids; its graphs; per-request generators
    draft_kv.py        which draft KV is valid (per block: leading slots matching the target's tokens)
    draft_batch.py     requests in, drafts out (DraftRequest, DraftBatch, AheadRequest, AheadDrafts)
    draft_proposer.py  this file: a proposal after the verification
    ahead_proposer.py  a proposal queued behind the verification it follows (propose_ahead, use_ahead)
    draft_passes.py    passes 2..k on the device (the draft loop graph when all rows are greedy)
    draft_sampler.py   sampling a pass on the device (argmax, or a sample from q)

One proposal step, after the target verified and the scheduler applied the result, per request with
num_tokens tokens (the last, just sampled, has no KV anywhere yet):

    pass 1:    catch-up tokens [valid prefix .. num_tokens) in one varlen pass -> logits -> d1
    pass j>1:  d_{j-1} at position num_tokens - 2 + j (a decode pass)        -> logits -> d_j

Each d_j is sampled from q_j, the draft's distribution under the request's sampling parameters
(draft_sampler.py); q_j is kept for the verifier's rejection sampling. Nothing waits for the device:
the drafts stay there for the target's next step (DraftBatch).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from infergrid.worker.config import EngineConfig
from infergrid.worker.engine.scheduler_output import DRAFT_PLACEHOLDER_ID, ScheduledRequest, SchedulerOutput
from infergrid.worker.runner.model_runner import ModelRunner
from infergrid.worker.spec_decode import ahead_proposer
from infergrid.worker.spec_decode.draft_batch import AheadDrafts, AheadRequest, DraftBatch, DraftRequest
from infergrid.worker.spec_decode.draft_model import DraftModel
from infergrid.worker.spec_decode.draft_passes import later_pass_inputs
from infergrid.worker.spec_decode.draft_sampler import DraftSampler

logger = logging.getLogger(__name__)


class DraftProposer:
    """Runs the draft model for the requests that speculate (see the module docstring).

    Args:
        config: the engine's config (draft_model, num_speculative_tokens, block_size, max_num_seqs).
        target: the target's ModelRunner (device, dtype, vocabulary, context length).
    """

    def __init__(self, config: EngineConfig, target: ModelRunner) -> None:
        self.model = DraftModel(config, target)
        # NOTE: with tensor parallelism the other ranks take each step's input ids from rank 0's step
        # header, so the drafts (the draft model runs unsharded, on rank 0 only) go to the host.
        self.drafts_on_host = target.tp_size > 1
        # The last proposal's drafts, on the device (requests' spec_token_ids hold DRAFT_PLACEHOLDER_ID
        # for them) and, for sampled requests, their distributions q.
        self.device_drafts: DraftBatch | None = None
        self.ahead: AheadDrafts | None = None  # proposed ahead of the verification running now
        self._ahead_for_step: AheadDrafts | None = None  # this step's, for propose_drafts
        self.num_ahead_proposals_total = 0  # requests whose drafts were proposed ahead

    @property
    def runner(self) -> ModelRunner:
        return self.model.runner

    @property
    def num_catch_up_tokens_total(self) -> int:
        """Tokens the draft computed to catch up with the target."""
        return self.model.num_catch_up_tokens_total

    # -- KV cache ----------------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        """Bytes of one draft KV block (the target sizes its pool for both)."""
        return self.model.kv_block_bytes()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the draft pool for a target pool of `num_blocks`: the target's block ids plus
        scratch blocks; capture graphs."""
        self.model.initialize_kv_cache(num_blocks)

    def note_step(self, scheduler_output: SchedulerOutput) -> None:
        """The target wrote KV for every scheduled token (draft_kv.py); the drafts proposed ahead of
        this step's verification are this step's to hand out (`propose_drafts`), or nobody's."""
        self.model.kv.note_target_writes(scheduler_output)
        self._ahead_for_step, self.ahead = self.ahead, None

    def remove_requests(self, request_ids: set[str]) -> None:
        self.model.remove_requests(request_ids)

    # -- proposing ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> DraftBatch | None:
        """Catch up and propose for every request (see the module docstring). A request whose
        catch-up does not fit this step's token cap catches up partly and proposes next time.

        NOTE: nothing here waits for the device. Each pass's drafts stay on the device as the next
        pass's input ids, the inputs of passes 2..k are uploaded at once, and the drafts stay there
        for the target's next step (DraftBatch). Proposing rows are ordered by number of drafts (most
        first, stably), so the rows that still draft at pass j are a prefix of pass j-1's rows."""
        draft = self.model
        bs = draft.block_size
        budget = draft.max_catch_up_tokens
        first: list[ScheduledRequest] = []
        proposing: list[tuple[DraftRequest, list[int], ScheduledRequest]] = []
        scratch = draft.num_target_blocks
        for dr in requests:
            req = dr.request
            computed = req.num_computed_tokens
            start = draft.kv.valid_prefix(dr.block_ids, computed)
            num_new = req.num_tokens - start
            if budget <= 0:
                break
            if num_new > budget:  # catch up only; no drafts this step
                num_new = budget
                first.append(draft.sched(req, start, req.all_token_ids[start : start + num_new], dr.block_ids,
                                         needs_sample=False))
                budget -= num_new
                draft.kv.mark_valid(dr.block_ids, start, min(start + num_new, computed))
                continue
            last_pos = req.num_tokens + draft.max_k - 2  # (the loop graph drafts max_k for every row)
            table = list(dr.block_ids)
            while len(table) <= last_pos // bs:
                table.append(scratch)
                scratch += 1
            proposing.append((dr, table, draft.sched(req, start, req.all_token_ids[start:], table,
                                                     needs_sample=True)))
            budget -= num_new
            draft.kv.mark_valid(dr.block_ids, start, computed)
        proposing.sort(key=lambda p: -p[0].num_drafts)
        first += [sched for _, _, sched in proposing]
        if not first:
            return None
        draft.num_catch_up_tokens_total += sum(s.num_new_tokens for s in first)
        runner = draft.runner
        batch = runner.prepare_inputs(first)
        hidden = runner.forward(batch)
        if not proposing:
            return None
        num_drafts = [dr.num_drafts for dr, _, _ in proposing]
        num_tokens = [dr.request.num_tokens for dr, _, _ in proposing]
        tables = [table for _, table, _ in proposing]
        sampler = DraftSampler(draft, [dr.request for dr, _, _ in proposing])
        tokens, probs = sampler.sample(runner.compute_logits(hidden[batch.logits_indices]), len(proposing))
        ids = [dr.request.request_id for dr, _, _ in proposing]
        loop = draft.loop_graphs
        if loop is not None and num_drafts[0] == draft.max_k > 1 and sampler.all_greedy_upto[-1]:
            # One replay drafts max_k for every row: rows that want fewer verify only theirs (the
            # passes run for the longest row anyway, and batched rows cost little more).
            later = later_pass_inputs(draft, num_tokens, tables, [draft.max_k] * len(proposing))
            if loop.fits(len(proposing), later.block_tables.shape[1]):
                return _batch(proposing, loop.run(tokens, later.positions[0], later.block_tables), {})
        later = later_pass_inputs(draft, num_tokens, tables, num_drafts) if num_drafts[0] > 1 else None
        pass_tokens, pass_probs = [tokens], [probs]
        for j, (num_rows, max_seq_len) in enumerate(later.rows if later is not None else [], start=1):
            assert later is not None
            batch = runner.decode_batch(
                tokens[:num_rows], later.positions[j - 1, :num_rows], later.slot_mapping[j - 1, :num_rows],
                later.query_start_loc[: num_rows + 1], later.seq_lens[j - 1, :num_rows],
                later.block_tables[:num_rows], max_seq_len,
            )
            tokens, probs = sampler.sample(runner.compute_logits(runner.forward(batch)), num_rows)
            pass_tokens.append(tokens)
            pass_probs.append(probs)
        drafts = torch.empty((len(proposing), len(pass_tokens)), dtype=torch.int64, device=runner.device)
        for j, t in enumerate(pass_tokens):
            drafts[: t.shape[0], j] = t
        probs = {
            req_id: torch.stack([pass_probs[j][i] for j in range(dr.num_drafts)])  # type: ignore[index]
            for i, (req_id, (dr, _, _)) in enumerate(zip(ids, proposing, strict=True)) if not sampler.greedy[i]
        }
        return _batch(proposing, drafts, probs)

    @torch.inference_mode()
    def propose_ahead(self, requests: list[AheadRequest], sampled: torch.Tensor) -> AheadDrafts | None:
        """The next drafts of a verification's requests, queued behind it (ahead_proposer.py)."""
        return ahead_proposer.propose_ahead(self.model, requests, sampled)

    def use_ahead(self, ahead: AheadDrafts, requests: list[DraftRequest], batch: DraftBatch | None) -> DraftBatch:
        """The drafts proposed ahead for `requests`, merged with `batch` (ahead_proposer.py)."""
        return ahead_proposer.use_ahead(self.model, ahead, requests, batch)

    # -- the Proposer interface (proposer.py) ------------------------------------------------------
    def launch_ahead(self, rows: Sequence[Any], sampled: torch.Tensor) -> None:
        """Right after a verification is launched (the runner's sample rows and their sampled tokens):
        propose the next drafts of its requests (no penalties, no seed) at once, queued behind it, for
        whatever number of drafts it accepts. `propose_drafts` then hands them to the requests that
        still want drafts, and the device runs the draft model while the host applies the step's
        result, instead of waiting for it."""
        self.ahead = None
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
            self.ahead = self.propose_ahead(requests, sampled)

    def propose_drafts(self, wanted: list[tuple[ScheduledRequest, int]], unverified: set[str]) -> dict[str, list[int]]:
        """Drafts for (request, k) pairs: those proposed ahead where the request is as they assumed,
        the others proposed now; left on the device (DRAFT_PLACEHOLDER_IDs) unless they must go to the host."""
        ahead, self._ahead_for_step = self._ahead_for_step, None
        self._keep_unverified_drafts(unverified)
        requests = [DraftRequest(s.request, s.block_ids, k) for s, k in wanted]
        is_ready = [ahead is not None and ahead.matches(dr.request) for dr in requests]
        ready = [dr for dr, r in zip(requests, is_ready, strict=True) if r]
        rest = [dr for dr, r in zip(requests, is_ready, strict=True) if not r]
        batch = self.propose(rest) if rest else None
        if ready:
            assert ahead is not None
            batch = self.use_ahead(ahead, ready, batch)
            self.num_ahead_proposals_total += len(ready)
        self.device_drafts = batch
        if batch is None:
            return {}
        if self.drafts_on_host or any(s.request.sampling_params.reads_output_tokens for s, _ in wanted
                                      if s.request_id in batch.rows):
            # Wait for the drafts: other TP ranks read input ids from the step header, and penalties at
            # draft positions count the drafts before them (on the host), as grammar matchers advance
            # over them (structured output).
            return batch.to_host()
        return {req_id: [DRAFT_PLACEHOLDER_ID] * n for req_id, n in batch.num_drafts.items()}

    def _keep_unverified_drafts(self, unverified: set[str]) -> None:
        """Requests still holding drafts of the batch about to be replaced (not scheduled since: a
        full token budget) get their values on the host (a wait, but a rare one)."""
        old = self.device_drafts
        if old is None:
            return
        stale = [req_id for req_id in unverified if req_id in old.rows]
        if not stale:
            return
        values = old.to_host()
        for req_id in stale:
            request = old.requests.get(req_id)
            if request is not None and DRAFT_PLACEHOLDER_ID in request.spec_token_ids:
                request.spec_token_ids = values[req_id][: len(request.spec_token_ids)]


def _batch(proposing: list[tuple[DraftRequest, list[int], ScheduledRequest]], drafts: torch.Tensor,
           probs: dict[str, torch.Tensor]) -> DraftBatch:
    return DraftBatch(
        drafts, {dr.request.request_id: i for i, (dr, _, _) in enumerate(proposing)},
        {dr.request.request_id: dr.num_drafts for dr, _, _ in proposing}, probs,
        {dr.request.request_id: dr.request for dr, _, _ in proposing},
    )
