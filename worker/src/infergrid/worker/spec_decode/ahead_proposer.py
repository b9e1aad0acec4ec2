"""Proposals made ahead: the draft model's next drafts, queued right behind the verification they follow.

`propose_ahead` (requests that verify drafts, without penalties or a seed) queues the same passes as
a normal proposal (draft_proposer.py) behind the target's verification, before anyone knows how many
drafts it accepts. Pass 1 takes the request's last known token and every token the target samples for
it (num_drafts + 1, those after a rejection -1, replaced by any token) and reads its logits at the
last token the target emits, found on the device from the number of non-negative samples; passes
2..k start right after that token (draft_passes.py). Draft KV written past it is speculative like any
other. When the result is known, `use_ahead` hands out those drafts to the requests whose state is
what they assumed (`AheadDrafts.matches`) and marks their draft KV valid up to the computed tokens;
the others propose normally. So the device drafts while the host applies the step's result and
schedules the next.

In the steady state (greedy, draft KV valid up to the last known token) the whole proposal is one
CUDA graph replay (ahead_graph.py); requests that verified fewer than k drafts have their sampled
rows padded with -1, read as rejections.
"""

from __future__ import annotations

import numpy as np
import torch

from infergrid.worker.engine.scheduler_output import ScheduledRequest
from infergrid.worker.spec_decode.draft_batch import AheadDrafts, AheadRequest, DraftBatch, DraftRequest
from infergrid.worker.spec_decode.draft_model import DraftModel
from infergrid.worker.spec_decode.draft_passes import passes_from
from infergrid.worker.spec_decode.draft_sampler import DraftSampler


def propose_ahead(draft: DraftModel, requests: list[AheadRequest], sampled: torch.Tensor) -> AheadDrafts | None:
    """Propose max_k drafts for each request of the verification just launched, queued behind it on
    the device (module docstring). `sampled`: the verification's sampled tokens, one row per
    (request, draft position)."""
    bs, k = draft.block_size, draft.max_k
    budget, scratch = draft.max_catch_up_tokens, draft.num_target_blocks
    kept: list[tuple[AheadRequest, list[int], int]] = []  # (request, block table, first position to compute)
    for ar in requests:
        c0, kn = ar.num_computed_tokens, ar.num_drafts
        start = draft.kv.valid_prefix(ar.block_ids, c0)
        num_new = c0 + 1 - start + kn + 1  # the known tokens from start, then the k_n + 1 sampled
        if num_new > budget or c0 + 2 * k >= draft.runner.max_model_len:  # (near the end: positions)
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
    runner, n = draft.runner, len(kept)
    width = max(len(t) for _, t, _ in kept)
    tables = np.zeros((n, width), dtype=np.int64)
    for i, (_, t, _) in enumerate(kept):
        tables[i, : len(t)] = t
    assumed = {ar.request.request_id: (i, ar, start) for i, (ar, _, start) in enumerate(kept)}
    graphs = draft.ahead_graphs
    if (graphs is not None and graphs.fits(n, width) and all(
            start == ar.num_computed_tokens and ar.request.sampling_params.is_greedy
            for ar, _, start in kept)):  # the steady state: one replay (ahead_graph.py)
        draft.num_catch_up_tokens_total += sum(ar.num_drafts + 2 for ar, _, _ in kept)
        # k + 1 sampled rows per request: those of a request that verified fewer drafts are read
        # as rejected (-1): their source is the row past the step's rows.
        pad = sampled.shape[0]
        src = [ar.first_row + j if j <= ar.num_drafts else pad for ar, _, _ in kept for j in range(k + 1)]
        flat = runner.upload_arrays([
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
        scheds.append(draft.sched(ar.request, start, [*known, *([0] * (kn + 1))], table, needs_sample=False))
        fill_pos += range(offset + len(known), offset + num_new)
        fill_src += range(ar.first_row, ar.first_row + kn + 1)
        owners += [len(scheds) - 1] * (kn + 1)
        emitted_at.append(offset + len(known))
        offset += num_new
    draft.num_catch_up_tokens_total += offset
    batch = runner.prepare_inputs(scheds)
    flat = runner.upload_arrays([np.asarray(x, dtype=np.int64) for x in (fill_pos, fill_src, owners, emitted_at)]
                                + [np.asarray([ar.num_computed_tokens for ar, _, _ in kept]), tables])
    pos_t, src_t, owners_t, emitted_t, c0_t, tables_t = flat.split([len(fill_pos)] * 3 + [n, n, tables.size])
    values = sampled[src_t]
    batch.input_ids[pos_t] = values.clamp(min=0)
    accepted = torch.zeros(n, dtype=torch.int64, device=runner.device).index_add_(
        0, owners_t, (values >= 0).to(torch.int64)) - 1
    hidden = runner.forward(batch)
    sampler = DraftSampler(draft, [ar.request for ar, _, _ in kept])
    first, q = sampler.sample(runner.compute_logits(hidden[emitted_t + accepted]), n)
    max_seq_len = max(ar.num_computed_tokens + ar.num_drafts for ar, _, _ in kept) + k + 1
    # The last token the target emits is at c0 + 1 + accepted; d1 goes right after it.
    drafts, probs = passes_from(draft, first, q, sampler, c0_t + accepted + 2, tables_t.view(n, width), max_seq_len)
    return AheadDrafts(drafts, assumed, {kept[i][0].request.request_id: p for i, p in probs.items()})


def use_ahead(draft: DraftModel, ahead: AheadDrafts, requests: list[DraftRequest],
              batch: DraftBatch | None) -> DraftBatch:
    """The drafts `propose_ahead` made for `requests` (each `ahead.matches` it; their draft KV is
    now valid up to their computed tokens), merged with `batch`, the other requests' proposals."""
    rows = []
    for dr in requests:
        row, ar, start = ahead.requests[dr.request.request_id]
        draft.kv.mark_valid(ar.block_ids, start, dr.request.num_computed_tokens)
        rows.append(row)
    tokens = ahead.tokens
    if rows != list(range(tokens.shape[0])):
        tokens = tokens[draft.runner.upload(np.asarray(rows, dtype=np.int64))]
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
