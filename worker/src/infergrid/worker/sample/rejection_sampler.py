"""Lossless verification of draft tokens (Leviathan et al. 2023; Chen et al. 2023).

A request with drafts d_1..d_k is sampled at k + 1 rows in one target forward pass; row i's target
distribution p_i (after the request's penalties, temperature, min_p, top_k, top_p: exactly what
the normal sampler would sample from) is conditioned on d_1..d_{i-1}. Row by row:

    accept d_i with probability min(1, p_i(d_i) / q_i(d_i))
    on the first rejection emit a token from norm(max(0, p_i - q_i)) and stop
    when all k are accepted, emit a bonus token from p_{k+1}

so every emitted token is distributed exactly as plain sampling from the target. q_i is the draft
model's distribution for d_i; a deterministic proposer (n-gram) has q_i = one-hot(d_i), which makes
the rule "accept with probability p_i(d_i), else sample p_i with d_i removed". Greedy rows (p is
one-hot at the argmax) accept while the draft equals the argmax and always emit the argmax, so
greedy output is identical with and without speculation.

Rows are independent here (every row gets a verdict and a token); the caller keeps each request's
tokens up to and including its first rejected row.
"""

from __future__ import annotations

import torch

from infergrid.worker.layers.triton_guard import tl, triton
from infergrid.worker.sample.argmax import argmax_rows
from infergrid.worker.sample.sampler import (
    Sampler,
    SamplerOutput,
    SamplingMetadata,
    random_sample,
)

NO_DRAFT = -1
CUT_BLOCK = 128


def uniform(num_rows: int, generators: dict[int, torch.Generator], device: torch.device) -> torch.Tensor:
    """U[0, 1) per row; seeded rows draw from their own generator."""
    u = torch.rand(num_rows, device=device) if len(generators) < num_rows else torch.empty(num_rows, device=device)
    for row, gen in generators.items():
        u[row] = torch.rand(1, generator=gen, device=device)[0]
    return u


def rejection_sample(
    target_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    is_greedy: torch.Tensor,
    generators: dict[int, torch.Generator] | None = None,
    draft_prob_rows: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify one draft token per row.

    Args:
        target_probs: [R, V] float32 target distribution per row (one-hot for greedy rows).
        draft_token_ids: [R] int64, the draft to verify at each row, or NO_DRAFT (a bonus row).
        is_greedy: [R] bool.
        generators: row -> seeded generator (uniforms and recovered samples draw from it).
        draft_prob_rows / draft_probs: [Rq] row indices and their [Rq, V] draft distributions q; rows
            with a draft that are not listed have a deterministic (one-hot) draft.

    Returns:
        (tokens [R], accepted [R] bool): the draft where accepted, else a sample from the residual
        (a bonus row's residual is p itself).
    """
    generators = generators or {}
    num_rows = target_probs.shape[0]
    device = target_probs.device
    has_draft = draft_token_ids >= 0
    drafts = draft_token_ids.clamp_min(0)
    p_draft = target_probs.gather(1, drafts[:, None]).squeeze(1)
    q_draft = torch.ones_like(p_draft)
    residual = target_probs.clone()
    one_hot_rows = has_draft.clone()
    if draft_prob_rows is not None and draft_prob_rows.numel():
        assert draft_probs is not None
        q_draft[draft_prob_rows] = draft_probs.gather(1, drafts[draft_prob_rows, None]).squeeze(1)
        residual[draft_prob_rows] = (target_probs[draft_prob_rows] - draft_probs).clamp_min_(0.0)
        one_hot_rows[draft_prob_rows] = False
    # max(0, p - one_hot(d)) is p with d removed.
    residual[one_hot_rows] = residual[one_hot_rows].scatter(1, drafts[one_hot_rows, None], 0.0)
    # p == q leaves nothing; rejection then has probability 0 (up to rounding), fall back to p.
    empty = residual.sum(dim=-1) <= 0
    if bool(empty.any()):
        residual[empty] = target_probs[empty]
    u = uniform(num_rows, generators, device)
    accepted = has_draft & (u * q_draft < p_draft)
    recovered = random_sample(residual, generators)
    tokens = torch.where(accepted, draft_token_ids, recovered)
    argmax = target_probs.argmax(dim=-1)
    accepted = torch.where(is_greedy, has_draft & (draft_token_ids == argmax), accepted)
    tokens = torch.where(is_greedy, argmax, tokens)
    return tokens, accepted


class RejectionSampler(torch.nn.Module):
    """The normal sampler's processing, then `rejection_sample`; returns a SamplerOutput whose
    `sampled[i]` is row i's emitted token (the draft itself where accepted), with its raw logprobs."""

    def __init__(self, sampler: Sampler | None = None) -> None:
        super().__init__()
        self.sampler = sampler or Sampler()

    def forward(
        self,
        logits: torch.Tensor,
        meta: SamplingMetadata,
        draft_token_ids: torch.Tensor,
        draft_prob_rows: torch.Tensor | None = None,
        draft_probs: torch.Tensor | None = None,
    ) -> SamplerOutput:
        raw_logprobs = logits.log_softmax(dim=-1) if meta.max_num_logprobs is not None else None
        if meta.all_greedy:  # p is one-hot at the argmax: every row emits it (drafts match or stop)
            tokens = argmax_rows(self.sampler.apply_processors(logits, meta))
        else:
            probs = self.sampler.compute_probs(logits, meta)
            assert meta.temperature is not None
            is_greedy = meta.temperature <= 0
            tokens, _ = rejection_sample(
                probs, draft_token_ids, is_greedy, meta.generators, draft_prob_rows, draft_probs
            )
        if raw_logprobs is None:
            return SamplerOutput(sampled=tokens)
        return Sampler.gather_logprobs(raw_logprobs, tokens, meta.max_num_logprobs or 0)


def keep_accepted_prefix(
    sampled: torch.Tensor, draft_token_ids: torch.Tensor, segment_starts: torch.Tensor, max_query_len: int,
    draft_sources: torch.Tensor | None = None, device_drafts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each row's emitted token, or -1 where a row of its request before it was rejected.

    Row i belongs to the request whose rows start at `segment_starts[i]` (at most `max_query_len` rows
    each). Row j's draft is `draft_token_ids[j]` (NO_DRAFT: a bonus row), or `device_drafts.view(-1)
    [draft_sources[j]]` where that source is >= 0 (drafts the draft model left on the device); the
    row is rejected when it sampled something else. One Triton launch on CUDA (the same as eight
    torch ops, whose host time the synchronous speculating step waits for); torch ops elsewhere."""
    if draft_sources is not None:
        assert device_drafts is not None
    cut = _keep_accepted_prefix_triton if sampled.is_cuda and triton is not None else _keep_accepted_prefix_torch
    return cut(sampled, draft_token_ids, segment_starts, max_query_len, draft_sources, device_drafts)


def _keep_accepted_prefix_triton(sampled: torch.Tensor, draft_token_ids: torch.Tensor, segment_starts: torch.Tensor,
                                 max_query_len: int, draft_sources: torch.Tensor | None,
                                 device_drafts: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty_like(sampled)
    rows = sampled.shape[0]
    has_device = draft_sources is not None
    _keep_accepted_prefix_kernel[(triton.cdiv(rows, CUT_BLOCK),)](
        sampled, draft_token_ids, segment_starts, draft_sources if has_device else segment_starts,
        device_drafts if has_device else sampled, out, rows,
        HAS_DEVICE_DRAFTS=has_device, MAX_Q=triton.next_power_of_2(max(max_query_len, 1)), BLOCK=CUT_BLOCK,
    )
    return out


def _keep_accepted_prefix_torch(sampled: torch.Tensor, draft_token_ids: torch.Tensor, segment_starts: torch.Tensor,
                                max_query_len: int, draft_sources: torch.Tensor | None,
                                device_drafts: torch.Tensor | None) -> torch.Tensor:
    drafts = draft_token_ids
    if draft_sources is not None:
        drafts = torch.where(draft_sources >= 0, device_drafts.view(-1)[draft_sources.clamp(min=0)], drafts)  # type: ignore[union-attr]
    rejected = (sampled != drafts).to(torch.int64)
    before = torch.cumsum(rejected, 0) - rejected  # rejections before each row, all requests
    before = before - before[segment_starts]
    return torch.where(before == 0, sampled, -1)


if triton is not None:

    @triton.jit(do_not_specialize=["rows"],  # one compiled kernel for every step (graph_inputs.py's NOTE)
                do_not_specialize_on_alignment=["sampled_ptr", "drafts_ptr", "starts_ptr", "sources_ptr",
                                                "device_drafts_ptr"])
    def _keep_accepted_prefix_kernel(
        sampled_ptr, drafts_ptr, starts_ptr, sources_ptr, device_drafts_ptr, out_ptr, rows,
        HAS_DEVICE_DRAFTS: tl.constexpr, MAX_Q: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = row < rows
        start = tl.load(starts_ptr + row, mask=live, other=0)
        mine = tl.load(sampled_ptr + row, mask=live, other=0)
        any_rejected = tl.zeros([BLOCK], dtype=tl.int1)
        for back in tl.static_range(1, MAX_Q):  # the rows of the same request before this one
            j = row - back
            earlier = live & (j >= start)
            tok = tl.load(sampled_ptr + j, mask=earlier, other=0)
            draft = tl.load(drafts_ptr + j, mask=earlier, other=0)
            if HAS_DEVICE_DRAFTS:
                src = tl.load(sources_ptr + j, mask=earlier, other=-1)
                on_device = earlier & (src >= 0)
                device_draft = tl.load(device_drafts_ptr + src, mask=on_device, other=0)
                draft = tl.where(on_device, device_draft, draft)
            any_rejected = any_rejected | (earlier & (tok != draft))
        tl.store(out_ptr + row, tl.where(any_rejected, -1, mine), mask=live)
