"""Batched sampling: grammar bitmask, penalties, temperature, min_p, top_k, top_p, per-request seeds, logprobs.

Order (as in vLLM v1): raw logprobs are taken from the model's logits; then the structured-output
bitmask (rows whose grammar forbids a token get -inf there), min-tokens masking,
repetition / frequency / presence penalties; greedy rows take the argmax here; the others are
divided by their temperature, filtered by min_p, top_k and top_p, and sampled with the
"exponential race" (argmax of p / q, q ~ Exp(1)), which equals sampling from p. A seeded request
draws its q from its own `torch.Generator`, so its tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from infergrid.worker.sample.argmax import argmax_rows
from infergrid.worker.structured_output.bitmask import apply_token_bitmask

_NEG_INF = float("-inf")


@dataclass
class SamplingMetadata:
    """Per-row sampling inputs for one step; optional tensors are None when no row needs them."""

    temperature: torch.Tensor | None  # [B] float32, 0 = greedy; None when all_greedy (never read then)
    all_greedy: bool
    top_p: torch.Tensor | None = None  # [B] float32, 1.0 = off
    top_k: torch.Tensor | None = None  # [B] int64, vocab_size = off
    min_p: torch.Tensor | None = None  # [B] float32, 0 = off
    presence_penalty: torch.Tensor | None = None  # [B]
    frequency_penalty: torch.Tensor | None = None  # [B]
    repetition_penalty: torch.Tensor | None = None  # [B], 1.0 = off
    prompt_token_ids: list[list[int]] | None = None  # for the repetition penalty
    output_token_ids: list[list[int]] | None = None  # for all penalties
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> seeded generator
    banned_token_ids: dict[int, list[int]] = field(default_factory=dict)  # row -> ids masked (min_tokens)
    max_num_logprobs: int | None = None  # top-k logprobs to return (None = none)
    # [B, ceil(V / 32)] int32 grammar bitmask (structured output); None when no row is constrained.
    # NOTE: set after the forward pass is launched (the host fills it while the device runs).
    token_bitmask: torch.Tensor | None = None


@dataclass
class SamplerOutput:
    """`sampled` [B]; with logprobs: `logprob_token_ids`/`logprobs` [B, 1 + k] (column 0 = the sampled
    token, then the top k by raw logprob) and `sampled_ranks` [B] (1 = most likely)."""

    sampled: torch.Tensor
    logprob_token_ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    sampled_ranks: torch.Tensor | None = None


def _token_mask(rows: list[list[int]], vocab_size: int, device: torch.device, counts: bool) -> torch.Tensor:
    """[B, V] occurrence counts (or a bool mask) of each row's token ids."""
    width = max((len(r) for r in rows), default=0)
    padded = torch.full((len(rows), max(width, 1)), vocab_size, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            padded[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    padded = padded.to(device, non_blocking=True)
    out = torch.zeros(len(rows), vocab_size + 1, dtype=torch.float32, device=device)
    out.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    out = out[:, :vocab_size]
    return out if counts else out > 0


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition (prompt + output tokens), then frequency and presence (output tokens) penalties."""
    if meta.output_token_ids is None:
        return logits
    vocab_size, device = logits.shape[1], logits.device
    output_counts = _token_mask(meta.output_token_ids, vocab_size, device, counts=True)
    if meta.repetition_penalty is not None:
        assert meta.prompt_token_ids is not None
        seen = _token_mask(meta.prompt_token_ids, vocab_size, device, counts=False) | (output_counts > 0)
        penalty = meta.repetition_penalty[:, None].expand_as(logits)
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, scaled, logits)
    if meta.frequency_penalty is not None:
        logits = logits - meta.frequency_penalty[:, None] * output_counts
    if meta.presence_penalty is not None:
        logits = logits - meta.presence_penalty[:, None] * (output_counts > 0).float()
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p * (the top token's probability)."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, _NEG_INF)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Keep the top_k largest logits (ties at the k-th value kept) and the smallest set whose
    probability reaches top_p; mask the rest with -inf. The top token always survives."""
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab_size = logits.shape[1]
    if top_k is not None:
        kth_index = (vocab_size - top_k.clamp(1, vocab_size)).unsqueeze(1)
        kth_value = sorted_logits.gather(1, kth_index)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_value, _NEG_INF)
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1.0 - top_p[:, None])
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Exponential race: argmax(p / q) with q ~ Exp(1); seeded rows use their own generator."""
    q = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        q.exponential_()
    for row, gen in generators.items():
        q[row].exponential_(generator=gen)
    return probs.div(q).argmax(dim=-1)


class Sampler(torch.nn.Module):
    """logits [B, V] (float32) + SamplingMetadata -> SamplerOutput."""

    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        raw_logprobs = logits.log_softmax(dim=-1) if meta.max_num_logprobs is not None else None
        logits = self.apply_processors(logits, meta)
        sampled = argmax_rows(logits)
        if not meta.all_greedy:
            assert meta.temperature is not None
            is_greedy = meta.temperature <= 0
            random = random_sample(self.random_probs(logits, meta), meta.generators)
            sampled = torch.where(is_greedy, sampled, random)
        if raw_logprobs is None:
            return SamplerOutput(sampled=sampled)
        return self.gather_logprobs(raw_logprobs, sampled, meta.max_num_logprobs or 0)

    def compute_probs(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """The distribution `forward` samples each row from, [B, V] float32: greedy rows are one-hot
        at their argmax. Speculative decoding verifies drafts against it (spec_decode/)."""
        logits = self.apply_processors(logits, meta)
        greedy = torch.zeros_like(logits).scatter_(1, argmax_rows(logits)[:, None], 1.0)
        if meta.all_greedy:
            return greedy
        assert meta.temperature is not None
        return torch.where((meta.temperature <= 0)[:, None], greedy, self.random_probs(logits, meta))

    @staticmethod
    def apply_processors(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Grammar bitmask, min_tokens bans, then repetition / frequency / presence penalties."""
        if meta.token_bitmask is not None:
            logits = apply_token_bitmask(logits, meta.token_bitmask)  # (in place: idempotent)
        if meta.banned_token_ids:
            logits = logits.clone()
            for row, ids in meta.banned_token_ids.items():
                logits[row, ids] = _NEG_INF
        return apply_penalties(logits, meta)

    @staticmethod
    def random_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Temperature (greedy rows use 1), min_p, top_k, top_p, softmax: [B, V] probabilities."""
        assert meta.temperature is not None
        is_greedy = meta.temperature <= 0
        temperature = torch.where(is_greedy, torch.ones_like(meta.temperature), meta.temperature)
        scaled = logits / temperature[:, None]
        if meta.min_p is not None:
            scaled = apply_min_p(scaled, meta.min_p)
        scaled = apply_top_k_top_p(scaled, meta.top_k, meta.top_p)
        return scaled.softmax(dim=-1)

    @staticmethod
    def gather_logprobs(logprobs: torch.Tensor, sampled: torch.Tensor, k: int) -> SamplerOutput:
        sampled_logprob = logprobs.gather(1, sampled[:, None])
        ranks = (logprobs > sampled_logprob).sum(dim=-1) + 1
        token_ids, values = sampled[:, None], sampled_logprob
        if k > 0:
            top_values, top_ids = logprobs.topk(k, dim=-1)
            token_ids = torch.cat([token_ids, top_ids], dim=1)
            values = torch.cat([values, top_values], dim=1)
        return SamplerOutput(sampled=sampled, logprob_token_ids=token_ids, logprobs=values, sampled_ranks=ranks)
