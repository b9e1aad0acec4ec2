"""Draft-model proposer: a smaller checkpoint with the target's tokenizer proposes k tokens per step.

The draft runs on the engine's own machinery: a second `ModelRunner` (its model, paged KV cache,
attention backend and CUDA graphs) whose KV pool mirrors the target's block ids, so the draft reads
and writes a request's KV through the target's block table:

    draft KV pool: [ block 0 (null) | blocks 1 .. N-1 (same ids as the target) | scratch blocks ]

Validity. The target writes KV for every token it computes (prefills, drafts, rejected drafts); the
draft computes lazily, only for requests that propose, so it keeps per block the number of leading
slots whose draft KV matches the target's tokens (`valid`). A target write at offset o of a block
truncates that block's count to o; a draft catch-up extends it, up to the target's computed tokens.
A request's draft context is the longest prefix of its block table that is valid, so preemption,
prefix-cache hits (a hit block keeps the draft KV it had), rewinds of rejected tokens and requests
that stopped speculating for a while all come out right: the draft just catches up from there.

One proposal step, after the target verified and the scheduler applied the result, per request with
num_tokens tokens (the last, just sampled, has no KV anywhere yet):

    pass 1:    catch-up tokens [valid prefix .. num_tokens) in one varlen pass -> logits -> d1
    pass j>1:  d_{j-1} at position num_tokens - 2 + j (a decode pass)        -> logits -> d_j

Proposed ahead (`propose_ahead`: requests that verify drafts, without penalties or a seed): the same
passes are queued right behind the target's verification, before anyone knows how many drafts it
accepts. Pass 1 takes the request's last known token and every token the target samples for it
(num_drafts + 1, those after a rejection -1, replaced by any token) and reads its logits at the last
token the target emits, found on the device from the number of non-negative samples; passes 2..k
start right after that token. Draft KV written past it is speculative like any other. When the
result is known, `use_ahead` hands out those drafts to the requests whose state is what they assumed
(`AheadDrafts.matches`) and marks their draft KV valid up to the computed tokens; the others propose
as below. So the device drafts while the host applies the step's result and schedules the next.
In the steady state (greedy, draft KV valid up to the last known token) the whole proposal is one
CUDA graph replay (ahead_graph.py); requests that verified fewer than k drafts (trimmed by the token
budget or max_tokens) have their sampled rows padded with -1, read as rejections.

Passes 2..k are decode passes of the same rows (fewer at the end when requests ask for fewer drafts):
their inputs are built and uploaded once, each pass reads the previous pass's drafts on the device,
and the host never waits: the drafts stay on the device for the target's next step (DraftBatch).
When every row is greedy and some row wants max_k drafts, passes 2..k are one CUDA graph replay
(draft_loop_graph.py), LM heads and argmaxes included, drafting max_k for every row (a request that
wants fewer verifies only its own); otherwise the draft model's decode graphs replay back to back.

Draft KV at positions past the target's computed tokens is speculative: it goes to the request's own
(uncached, unshared) blocks or, past the end of its block table, to scratch blocks, and is never
counted as valid. Each d_j is sampled from q_j, the draft's distribution under the request's
temperature / top_k / top_p / min_p (penalties are not applied to the draft; any q is exact,
a closer one just accepts more); q_j is kept for the verifier's rejection sampling.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from infergrid.worker.config import EngineConfig
from infergrid.worker.engine.kv_cache import kv_block_bytes
from infergrid.worker.engine.model_runner import ModelRunner
from infergrid.worker.engine.request import Request
from infergrid.worker.engine.scheduler import ScheduledRequest, SchedulerOutput
from infergrid.worker.layers.argmax import argmax_rows
from infergrid.worker.layers.fp8_lm_head import Fp8LMHead
from infergrid.worker.layers.sampler import Sampler, SamplingMetadata, random_sample
from infergrid.worker.loader import resolve_model_path
from infergrid.worker.model_config import ModelConfig
from infergrid.worker.spec_decode.ahead_graph import AheadGraphRunner
from infergrid.worker.spec_decode.draft_loop_graph import DraftLoopGraphRunner, slot_mapping_of

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass
class DraftRequest:
    """One request that proposes this step: its block table (the target's) and its number of drafts."""

    request: Request
    block_ids: list[int]
    num_drafts: int


@dataclass
class AheadRequest:
    """A request verifying drafts in the step just launched (`DraftProposer.propose_ahead`)."""

    request: Request
    block_ids: list[int]
    num_computed_tokens: int  # the step's first position: the request's last known token
    num_drafts: int  # drafts being verified
    first_row: int  # its first row in the step's sampled tokens (num_drafts + 1 rows)


@dataclass
class AheadDrafts:
    """Drafts proposed ahead of the verification they follow: max_k per request, on the device."""

    tokens: torch.Tensor  # int64 [rows, max_k]
    requests: dict[str, tuple[int, AheadRequest, int]]  # request id -> (row, what it assumed, catch-up start)
    probs: dict[str, torch.Tensor]  # sampled requests: their draft distributions q [max_k, V]

    def matches(self, request: Request) -> bool:
        """Whether the verification left `request` as the drafts assumed: running on, with its tokens
        appended (any number of accepted drafts) and nothing else changed."""
        entry = self.requests.get(request.request_id)
        if entry is None or entry[1].request is not request:
            return False
        ahead = entry[1]
        num_new = request.num_tokens - ahead.num_computed_tokens - 1  # accepted drafts + 1
        return 1 <= num_new <= ahead.num_drafts + 1 and request.num_computed_tokens == request.num_tokens - 1


@dataclass
class DraftBatch:
    """One proposal step's drafts, left on the device: the target's next step reads them there (its
    input ids and the verifier's draft ids), so proposing never waits for the draft model."""

    tokens: torch.Tensor  # int64 [rows, max drafts]: row i's first num_drafts[req] entries are its drafts
    rows: dict[str, int]  # request id -> row
    num_drafts: dict[str, int]
    probs: dict[str, torch.Tensor]  # sampled (non-greedy) requests: their draft distributions q [k, V]
    requests: dict[str, Request]

    def source_index(self, request_id: str, j: int) -> int:
        """Index of request's draft j in tokens.view(-1)."""
        return self.rows[request_id] * self.tokens.shape[1] + j

    def to_host(self) -> dict[str, list[int]]:
        """The drafts' values (waits for the draft model)."""
        values = self.tokens.tolist()
        return {req_id: values[row][: self.num_drafts[req_id]] for req_id, row in self.rows.items()}


class DraftProposer:
    """Runs the draft model for the requests that speculate (see the module docstring).

    Args:
        config: the engine's config (draft_model, num_speculative_tokens, block_size, max_num_seqs).
        target: the target's ModelRunner (device, dtype, vocabulary, context length).
    """

    def __init__(self, config: EngineConfig, target: ModelRunner) -> None:
        assert config.draft_model is not None  # EngineConfig checks
        path = resolve_model_path(config.draft_model, cache_dir=config.model_cache_dir)
        self.model_config = ModelConfig.from_pretrained(path)
        target_cfg = target.model_config
        if self.model_config.vocab_size != target_cfg.vocab_size:
            raise ValueError(
                f"draft_model vocabulary ({self.model_config.vocab_size} tokens) differs from the target's "
                f"({target_cfg.vocab_size}); the draft must share the target's tokenizer"
            )
        if self.model_config.max_position_embeddings < target.max_model_len:
            raise ValueError(
                f"draft_model max_position_embeddings {self.model_config.max_position_embeddings} is below "
                f"max_model_len {target.max_model_len}"
            )
        self.block_size = config.block_size
        self.max_k = config.num_speculative_tokens
        # Per proposing request: room past its table for a proposal made ahead, whose pass 1 writes k + 1
        # sampled tokens (padded to k + 1) and passes 2..k write up to k - 1 more.
        self.num_scratch_per_request = -(-2 * self.max_k // self.block_size) + 1
        self.num_scratch_blocks = config.max_num_seqs * self.num_scratch_per_request
        dtype = config.dtype if config.dtype != "auto" else _DTYPE_NAMES.get(target.dtype, "auto")
        draft_config = dataclasses.replace(
            config, model=path, dtype=dtype, speculative_method=None, num_speculative_tokens=0,
            draft_model=None, draft_lm_head_dtype=None, tensor_parallel_size=1,
        )
        self.runner = ModelRunner(draft_config, path, self.model_config, target.max_model_len, target.eos_token_ids)
        if config.draft_lm_head_dtype == "fp8":  # (before any CUDA graph is captured)
            self.runner.model.lm_head = Fp8LMHead(self.runner.model.lm_head.weight)
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}
        self.valid = np.zeros(0, dtype=np.int64)
        self.num_target_blocks = 0
        # Tokens a pass may catch up (bounds the draft's activation memory like the target's budget).
        self.max_catch_up_tokens = config.get_max_num_batched_tokens()
        self.num_catch_up_tokens_total = 0  # tokens the draft computed to catch up with the target
        self.loop_graphs: DraftLoopGraphRunner | None = None  # with CUDA graphs (draft_loop_graph.py)
        self.ahead_graphs: AheadGraphRunner | None = None  # with CUDA graphs (ahead_graph.py)

    # -- KV cache ----------------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        """Bytes of one draft KV block (the target sizes its pool for both)."""
        return kv_block_bytes(self.model_config, self.block_size, self.runner.dtype)

    def initialize_kv_cache(self, num_target_blocks: int) -> None:
        """Allocate the draft pool: the target's block ids plus scratch blocks; capture graphs."""
        self.num_target_blocks = num_target_blocks
        self.valid = np.zeros(num_target_blocks, dtype=np.int64)
        runner = self.runner
        runner.config = dataclasses.replace(
            runner.config, num_gpu_blocks_override=num_target_blocks + self.num_scratch_blocks
        )
        runner.initialize_kv_cache()  # decode CUDA graphs for passes 2..k
        if runner.cuda_graphs is not None:
            from infergrid.worker.spec_decode.verify_graph import MultiTokenCUDAGraphRunner

            # Pass 1 of a proposal made after the verification, and of one made ahead outside the steady
            # state: the last computed token, the accepted (or all) drafts and the bonus.
            runner.multi_token_graphs = MultiTokenCUDAGraphRunner(runner, self.max_k + 2)
            runner.multi_token_graphs.capture()
            if self.max_k > 1:  # passes 2..k of greedy steps in one replay
                self.loop_graphs = DraftLoopGraphRunner(runner, self.max_k)
                self.loop_graphs.capture()
            self.ahead_graphs = AheadGraphRunner(runner, self.max_k)  # steady-state proposals made ahead
            self.ahead_graphs.capture()

    # -- validity ----------------------------------------------------------------------------------
    def note_target_writes(self, scheduler_output: SchedulerOutput) -> None:
        """The target wrote KV for every scheduled token: truncate those blocks' draft validity.

        NOTE: a one-token write (a decode) inside a block changes nothing: the request has held that
        block since the write at its offset 0 (which reset it), and its draft KV is never valid past
        its computed tokens, i.e. past the write. So a decode step costs a check per request here."""
        bs = self.block_size
        for s in scheduler_output.scheduled:
            start, num_new = s.num_computed_tokens, s.num_new_tokens
            if num_new <= 0 or (num_new == 1 and start % bs):
                continue
            end = start + num_new
            first, last = start // bs, (end - 1) // bs
            ids = s.block_ids[first : last + 1]
            b0 = ids[0]
            self.valid[b0] = min(self.valid[b0], start - first * bs)
            if len(ids) > 1:
                self.valid[ids[1:]] = 0

    def valid_prefix(self, block_ids: list[int], limit: int) -> int:
        """Leading positions of this block table whose draft KV is valid (at most `limit`)."""
        num_blocks = min(len(block_ids), -(-limit // self.block_size))
        if num_blocks == 0:
            return 0
        counts = self.valid[np.asarray(block_ids[:num_blocks])]
        partial = np.flatnonzero(counts < self.block_size)
        if partial.size == 0:
            return min(num_blocks * self.block_size, limit)
        i = int(partial[0])
        return min(i * self.block_size + int(counts[i]), limit)

    def _mark_valid(self, block_ids: list[int], start: int, end: int) -> None:
        """Draft KV now matches the target's for positions [start, end) (start is the valid prefix)."""
        bs = self.block_size
        pos = start
        while pos < end:
            b = block_ids[pos // bs]
            stop = min(end, (pos // bs + 1) * bs)
            self.valid[b] = stop - (pos // bs) * bs
            pos = stop

    # -- proposing ---------------------------------------------------------------------------------
    def remove_requests(self, request_ids: set[str]) -> None:
        for req_id in request_ids:
            self.generators.pop(req_id, None)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> DraftBatch | None:
        """Catch up and propose for every request (see the module docstring). A request whose
        catch-up does not fit this step's token cap catches up partly and proposes next time.

        NOTE: nothing here waits for the device. Each pass's drafts stay on the device as the next
        pass's input ids, the inputs of passes 2..k are uploaded at once, and the drafts stay there
        for the target's next step (DraftBatch). Proposing rows are ordered by number of drafts (most
        first, stably), so the rows that still draft at pass j are a prefix of pass j-1's rows."""
        bs = self.block_size
        budget = self.max_catch_up_tokens
        first: list[ScheduledRequest] = []
        proposing: list[tuple[DraftRequest, list[int], ScheduledRequest]] = []
        scratch = self.num_target_blocks
        for dr in requests:
            req = dr.request
            computed = req.num_computed_tokens
            start = self.valid_prefix(dr.block_ids, computed)
            num_new = req.num_tokens - start
            if budget <= 0:
                break
            if num_new > budget:  # catch up only; no drafts this step
                num_new = budget
                first.append(self._sched(req, start, req.all_token_ids[start : start + num_new], dr.block_ids,
                                         needs_sample=False))
                budget -= num_new
                self._mark_valid(dr.block_ids, start, min(start + num_new, computed))
                continue
            last_pos = req.num_tokens + self.max_k - 2  # (the loop graph drafts max_k for every row)
            table = list(dr.block_ids)
            while len(table) <= last_pos // bs:
                table.append(scratch)
                scratch += 1
            proposing.append((dr, table, self._sched(req, start, req.all_token_ids[start:], table, needs_sample=True)))
            budget -= num_new
            self._mark_valid(dr.block_ids, start, computed)
        proposing.sort(key=lambda p: -p[0].num_drafts)
        first += [sched for _, _, sched in proposing]
        if not first:
            return None
        self.num_catch_up_tokens_total += sum(s.num_new_tokens for s in first)
        runner = self.runner
        batch = runner._prepare_inputs(first)
        hidden = runner._forward(batch)
        if not proposing:
            return None
        num_drafts = [dr.num_drafts for dr, _, _ in proposing]
        num_tokens = [dr.request.num_tokens for dr, _, _ in proposing]
        tables = [table for _, table, _ in proposing]
        sampler = _DraftSampler(self, [dr.request for dr, _, _ in proposing])
        tokens, probs = sampler.sample(runner.model.compute_logits(hidden[batch.logits_indices]), len(proposing))
        ids = [dr.request.request_id for dr, _, _ in proposing]
        loop = self.loop_graphs
        if loop is not None and num_drafts[0] == self.max_k > 1 and sampler.all_greedy_upto[-1]:
            # One replay drafts max_k for every row: rows that want fewer verify only theirs (the
            # passes run for the longest row anyway, and batched rows cost little more).
            later = self._later_passes(num_tokens, tables, [self.max_k] * len(proposing))
            if loop.fits(len(proposing), later.block_tables.shape[1]):
                return self._batch(proposing, loop.run(tokens, later.positions[0], later.block_tables), {})
        later = self._later_passes(num_tokens, tables, num_drafts) if num_drafts[0] > 1 else None
        pass_tokens, pass_probs = [tokens], [probs]
        for j, (num_rows, max_seq_len) in enumerate(later.rows if later is not None else [], start=1):
            assert later is not None
            batch = runner.decode_batch(
                tokens[:num_rows], later.positions[j - 1, :num_rows], later.slot_mapping[j - 1, :num_rows],
                later.query_start_loc[: num_rows + 1], later.seq_lens[j - 1, :num_rows],
                later.block_tables[:num_rows], max_seq_len,
            )
            tokens, probs = sampler.sample(runner.model.compute_logits(runner._forward(batch)), num_rows)
            pass_tokens.append(tokens)
            pass_probs.append(probs)
        drafts = torch.empty((len(proposing), len(pass_tokens)), dtype=torch.int64, device=runner.device)
        for j, t in enumerate(pass_tokens):
            drafts[: t.shape[0], j] = t
        probs = {
            req_id: torch.stack([pass_probs[j][i] for j in range(dr.num_drafts)])  # type: ignore[index]
            for i, (req_id, (dr, _, _)) in enumerate(zip(ids, proposing, strict=True)) if not sampler.greedy[i]
        }
        return self._batch(proposing, drafts, probs)

    @torch.inference_mode()
    def propose_ahead(self, requests: list[AheadRequest], sampled: torch.Tensor) -> AheadDrafts | None:
        """Propose max_k drafts for each request of the verification just launched, queued
        behind it on the device, before anyone knows how many of its drafts it accepts: pass 1 takes
        the request's last known token and all num_drafts + 1 tokens the target samples (the rows
        after a rejection are -1: any token will do), and reads its logits at the last token the
        target emits; passes 2..k start right after it (module docstring). `sampled`: the
        verification's sampled tokens, one row per (request, draft position)."""
        bs, k = self.block_size, self.max_k
        budget, scratch = self.max_catch_up_tokens, self.num_target_blocks
        kept: list[tuple[AheadRequest, list[int], int]] = []  # (request, block table, first position to compute)
        for ar in requests:
            c0, kn = ar.num_computed_tokens, ar.num_drafts
            start = self.valid_prefix(ar.block_ids, c0)
            num_new = c0 + 1 - start + kn + 1  # the known tokens from start, then the k_n + 1 sampled
            if num_new > budget or c0 + 2 * k >= self.runner.max_model_len:  # (near the end: positions)
                continue
            if ar.request.max_tokens is not None and ar.request.num_output_tokens + kn + 2 >= ar.request.max_tokens:
                continue  # if every draft is accepted, the request wants no more drafts
            budget -= num_new
            table = list(ar.block_ids)  # covers c0 + kn; the last pass writes at c0 + 2k at most (padded)
            while len(table) <= (c0 + 2 * k) // bs:
                table.append(scratch)
                scratch += 1
            kept.append((ar, table, start))
        if not kept:
            return None
        runner, n = self.runner, len(kept)
        width = max(len(t) for _, t, _ in kept)
        tables = np.zeros((n, width), dtype=np.int64)
        for i, (_, t, _) in enumerate(kept):
            tables[i, : len(t)] = t
        assumed = {ar.request.request_id: (i, ar, start) for i, (ar, _, start) in enumerate(kept)}
        graphs = self.ahead_graphs
        if (graphs is not None and graphs.fits(n, width) and all(
                start == ar.num_computed_tokens and ar.request.sampling_params.is_greedy
                for ar, _, start in kept)):  # the steady state: one replay (ahead_graph.py)
            self.num_catch_up_tokens_total += sum(ar.num_drafts + 2 for ar, _, _ in kept)
            # k + 1 sampled rows per request: those of a request that verified fewer drafts are read
            # as rejected (-1): their source is the row past the step's rows.
            pad = sampled.shape[0]
            src = [ar.first_row + j if j <= ar.num_drafts else pad for ar, _, _ in kept for j in range(k + 1)]
            flat = runner._upload_flat([
                np.asarray([ar.request.all_token_ids[ar.num_computed_tokens] for ar, _, _ in kept]),
                np.asarray([ar.num_computed_tokens for ar, _, _ in kept]), np.asarray(src), tables])
            return AheadDrafts(graphs.run(flat, sampled, n, width), assumed, {})
        scheds: list[ScheduledRequest] = []
        fill_pos: list[int] = []  # pass 1's input rows the target's sampled tokens go to
        fill_src: list[int] = []  # ... and their rows in `sampled`
        owners: list[int] = []
        emitted_at: list[int] = []  # pass 1's input row of each request's first sampled token
        offset = 0
        for ar, table, start in kept:
            c0, kn = ar.num_computed_tokens, ar.num_drafts
            known = ar.request.all_token_ids[start : c0 + 1]
            num_new = len(known) + kn + 1
            scheds.append(self._sched(ar.request, start, [*known, *([0] * (kn + 1))], table, needs_sample=False))
            fill_pos += range(offset + len(known), offset + num_new)
            fill_src += range(ar.first_row, ar.first_row + kn + 1)
            owners += [len(scheds) - 1] * (kn + 1)
            emitted_at.append(offset + len(known))
            offset += num_new
        self.num_catch_up_tokens_total += offset
        batch = runner._prepare_inputs(scheds)
        flat = runner._upload_flat([np.asarray(x, dtype=np.int64) for x in (fill_pos, fill_src, owners, emitted_at)]
                                   + [np.asarray([ar.num_computed_tokens for ar, _, _ in kept]), tables])
        pos_t, src_t, owners_t, emitted_t, c0_t, tables_t = flat.split([len(fill_pos)] * 3 + [n, n, tables.size])
        values = sampled[src_t]
        batch.input_ids[pos_t] = values.clamp(min=0)
        accepted = torch.zeros(n, dtype=torch.int64, device=runner.device).index_add_(
            0, owners_t, (values >= 0).to(torch.int64)) - 1
        hidden = runner._forward(batch)
        sampler = _DraftSampler(self, [ar.request for ar, _, _ in kept])
        first, q = sampler.sample(runner.model.compute_logits(hidden[emitted_t + accepted]), n)
        max_seq_len = max(ar.num_computed_tokens + ar.num_drafts for ar, _, _ in kept) + k + 1
        # The last token the target emits is at c0 + 1 + accepted; d1 goes right after it.
        drafts, probs = self._passes_from(first, q, sampler, c0_t + accepted + 2, tables_t.view(n, width),
                                          max_seq_len)
        return AheadDrafts(drafts, assumed, {kept[i][0].request.request_id: p for i, p in probs.items()})

    def use_ahead(self, ahead: AheadDrafts, requests: list[DraftRequest], batch: DraftBatch | None) -> DraftBatch:
        """The drafts `propose_ahead` made for `requests` (each `ahead.matches` it; their draft KV is
        now valid up to their computed tokens), merged with `batch`, the other requests' proposals."""
        rows = []
        for dr in requests:
            row, ar, start = ahead.requests[dr.request.request_id]
            self._mark_valid(ar.block_ids, start, dr.request.num_computed_tokens)
            rows.append(row)
        tokens = ahead.tokens
        if rows != list(range(tokens.shape[0])):
            tokens = tokens[self.runner._upload(np.asarray(rows, dtype=np.int64))]
        ids = [dr.request.request_id for dr in requests]
        merged = DraftBatch(tokens, {req_id: i for i, req_id in enumerate(ids)},
                            {dr.request.request_id: dr.num_drafts for dr in requests},
                            {req_id: ahead.probs[req_id] for req_id in ids if req_id in ahead.probs},
                            {dr.request.request_id: dr.request for dr in requests})
        if batch is None:
            return merged
        other = batch.tokens
        if other.shape[1] < tokens.shape[1]:
            other = torch.nn.functional.pad(other, (0, tokens.shape[1] - other.shape[1]))
        merged.tokens = torch.cat([tokens, other])
        merged.rows.update({req_id: len(requests) + row for req_id, row in batch.rows.items()})
        merged.num_drafts.update(batch.num_drafts)
        merged.probs.update(batch.probs)
        merged.requests.update(batch.requests)
        return merged

    def _passes_from(self, first: torch.Tensor, q: torch.Tensor | None, sampler: _DraftSampler,
                     start: torch.Tensor, tables: torch.Tensor,
                     max_seq_len: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Passes 2..k of n rows that all draft k tokens, whose first drafts are `first` [n] (sampled
        from `q` [n, V], None when all rows are greedy) and go at positions `start` [n] (device
        tensors both); `tables` [n, W] int64 block tables covering them; `max_seq_len` bounds their
        lengths. Returns drafts [n, k] and, per sampled row, its draft distributions [k, V]."""
        n, k = first.shape[0], self.max_k
        runner = self.runner
        tables32 = tables.to(torch.int32)
        loop = self.loop_graphs
        if q is None and k > 1 and loop is not None and loop.fits(n, tables.shape[1]):
            return loop.run(first, start, tables32), {}
        pass_probs = [q]
        positions = start[:, None] + torch.arange(k - 1, device=runner.device)  # [n, k - 1]
        slots = slot_mapping_of(tables, positions, self.block_size).T.contiguous()
        positions = positions.T.contiguous()
        seq_lens = (positions + 1).to(torch.int32)
        query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=runner.device)
        drafts = [first]
        for j in range(k - 1):
            batch = runner.decode_batch(drafts[-1], positions[j], slots[j], query_start_loc, seq_lens[j], tables32,
                                        max_seq_len)
            tokens, q = sampler.sample(runner.model.compute_logits(runner._forward(batch)), n)
            drafts.append(tokens)
            pass_probs.append(q)
        probs = {i: torch.stack([p[i] for p in pass_probs]) for i in range(n) if not sampler.greedy[i]}  # type: ignore[index]
        return torch.stack(drafts, dim=1), probs

    @staticmethod
    def _batch(proposing: list[tuple[DraftRequest, list[int], ScheduledRequest]], drafts: torch.Tensor,
               probs: dict[str, torch.Tensor]) -> DraftBatch:
        return DraftBatch(
            drafts, {dr.request.request_id: i for i, (dr, _, _) in enumerate(proposing)},
            {dr.request.request_id: dr.num_drafts for dr, _, _ in proposing}, probs,
            {dr.request.request_id: dr.request for dr, _, _ in proposing},
        )

    def _later_passes(self, num_tokens: list[int], tables: list[list[int]], num_drafts: list[int]) -> _LaterPasses:
        """Device inputs of passes 2..k for rows ordered by num_drafts (descending): pass j feeds
        row i's draft d_{j-1} at position num_tokens - 2 + j, for the rows with num_drafts >= j."""
        bs = self.block_size
        num_rows, num_passes = len(num_tokens), num_drafts[0] - 1
        width = max(len(t) for t in tables)
        block_tables = np.zeros((num_rows, width), dtype=np.int64)
        for i, t in enumerate(tables):
            block_tables[i, : len(t)] = t
        positions = np.asarray(num_tokens, dtype=np.int64)[None, :] + np.arange(num_passes)[:, None]  # [passes, rows]
        columns = np.minimum(positions // bs, width - 1)  # (rows past their last pass: never read)
        slot_mapping = block_tables[np.arange(num_rows)[None, :], columns] * bs + positions % bs
        drafting = np.asarray(num_drafts)[None, :] > np.arange(1, num_passes + 1)[:, None]
        rows = [(n, int(positions[j, :n].max()) + 1) for j, n in enumerate(drafting.sum(axis=1).tolist())]
        flat = self.runner._upload_flat([positions, slot_mapping, positions + 1, np.arange(num_rows + 1), block_tables])
        sizes = [positions.size] * 3 + [num_rows + 1, block_tables.size]
        pos, slots, seq_lens, qsl, tab = flat.split(sizes)
        return _LaterPasses(
            rows=rows,
            positions=pos.view(num_passes, num_rows),
            slot_mapping=slots.view(num_passes, num_rows),
            seq_lens=seq_lens.view(num_passes, num_rows).to(torch.int32),
            query_start_loc=qsl.to(torch.int32),
            block_tables=tab.view(num_rows, width).to(torch.int32),
        )

    @staticmethod
    def _sched(request: Request, start: int, token_ids: list[int], block_ids: list[int],
               needs_sample: bool) -> ScheduledRequest:
        return ScheduledRequest(
            request=request, num_computed_tokens=start, num_new_tokens=len(token_ids), token_ids=token_ids,
            spec_token_ids=[], block_ids=block_ids, is_prefill=len(token_ids) > 1, needs_sample=needs_sample,
        )

    def _generator(self, request_id: str, seed: int) -> torch.Generator:
        gen = self.generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.runner.device)
            gen.manual_seed(seed ^ 0x5EED)  # the draft's own stream, apart from the target's
            self.generators[request_id] = gen
        return gen


@dataclass
class _LaterPasses:
    """Device inputs of draft passes 2..k ([pass, row] for the per-pass ones); `rows[p]` is
    (number of rows that draft at pass p + 2, their max seq len)."""

    rows: list[tuple[int, int]]
    positions: torch.Tensor  # int64 [passes, rows]
    slot_mapping: torch.Tensor  # int64 [passes, rows]
    seq_lens: torch.Tensor  # int32 [passes, rows]
    query_start_loc: torch.Tensor  # int32 [rows + 1] (0, 1, 2, ...)
    block_tables: torch.Tensor  # int32 [rows, width]


class _DraftSampler:
    """Samples one draft pass on the device for the first `num_rows` of a fixed list of requests:
    argmax for greedy rows, else a sample from q (the request's temperature, top_k, top_p, min_p),
    which is returned. The sampling inputs are uploaded once for all passes."""

    def __init__(self, proposer: DraftProposer, requests: list[Request]) -> None:
        params = [r.sampling_params for r in requests]
        self.greedy = [p.is_greedy for p in params]
        self.all_greedy_upto = list(itertools.accumulate(self.greedy, operator.and_))
        self.sampler = proposer.sampler
        if all(self.greedy):
            return
        up = proposer.runner._to_device
        vocab = proposer.model_config.vocab_size
        self.any_top_p = list(itertools.accumulate((p.top_p < 1.0 for p in params), operator.or_))
        self.any_top_k = list(itertools.accumulate((p.top_k > 0 for p in params), operator.or_))
        self.any_min_p = list(itertools.accumulate((p.min_p > 0 for p in params), operator.or_))
        self.temperature = _upload([0.0 if g else p.temperature for g, p in zip(self.greedy, params, strict=True)],
                                   torch.float32, up)
        self.is_greedy = _upload(self.greedy, torch.bool, up)
        self.top_p = _upload([p.top_p for p in params], torch.float32, up) if self.any_top_p[-1] else None
        self.top_k = _upload([p.top_k if p.top_k > 0 else vocab for p in params], torch.int64, up) \
            if self.any_top_k[-1] else None
        self.min_p = _upload([p.min_p for p in params], torch.float32, up) if self.any_min_p[-1] else None
        self.generators = {
            i: proposer._generator(r.request_id, p.seed)
            for i, (r, p) in enumerate(zip(requests, params, strict=True)) if p.seed is not None and not p.is_greedy
        }

    def sample(self, logits: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits [num_rows, V] of the first num_rows requests -> (tokens [num_rows], q [num_rows, V] or
        None when those rows are all greedy)."""
        if self.all_greedy_upto[num_rows - 1]:
            return argmax_rows(logits), None
        last = num_rows - 1
        meta = SamplingMetadata(
            temperature=self.temperature[:num_rows], all_greedy=False,
            top_p=self.top_p[:num_rows] if self.top_p is not None and self.any_top_p[last] else None,
            top_k=self.top_k[:num_rows] if self.top_k is not None and self.any_top_k[last] else None,
            min_p=self.min_p[:num_rows] if self.min_p is not None and self.any_min_p[last] else None,
            generators={i: g for i, g in self.generators.items() if i < num_rows},
        )
        probs = self.sampler.compute_probs(logits, meta)
        sampled = torch.where(self.is_greedy[:num_rows], logits.argmax(dim=-1),
                              random_sample(probs, meta.generators))
        return sampled, probs


def _upload(values: list, dtype: torch.dtype, to_device: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A small host list -> device tensor without waiting for the device (the runner's staging)."""
    return to_device(torch.tensor(values, dtype=dtype))
