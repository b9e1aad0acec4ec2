"""Sampling a draft pass on the device: argmax for greedy rows, else a sample from q.

q is the draft's distribution under the request's temperature / top_k / top_p / min_p (penalties are
not applied to the draft; any q is exact, a closer one just accepts more); it is kept for the
verifier's rejection sampling (sample/rejection_sampler.py).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable

import torch

from infergrid.worker.engine.request import Request
from infergrid.worker.sample.argmax import argmax_rows
from infergrid.worker.sample.sampler import SamplingMetadata, random_sample
from infergrid.worker.spec_decode.draft_model import DraftModel


class DraftSampler:
    """Samples one draft pass on the device for the first `num_rows` of a fixed list of requests:
    argmax for greedy rows, else a sample from q (the request's temperature, top_k, top_p, min_p),
    which is returned. The sampling inputs are uploaded once for all passes."""

    def __init__(self, draft: DraftModel, requests: list[Request]) -> None:
        params = [r.sampling_params for r in requests]
        self.greedy = [p.is_greedy for p in params]
        self.all_greedy_upto = list(itertools.accumulate(self.greedy, operator.and_))
        self.sampler = draft.sampler
        if all(self.greedy):
            return
        up = draft.runner.to_device
        vocab = draft.model_config.vocab_size
        self.any_top_p = list(itertools.accumulate((p.top_p < 1.0 for p in params), operator.or_))
        self.any_top_k = list(itertools.accumulate((p.top_k > 0 for p in params), operator.or_))
        self.any_min_p = list(itertools.accumulate((p.min_p > 0 for p in params), operator.or_))
        self.temperature = upload([0.0 if g else p.temperature for g, p in zip(self.greedy, params, strict=True)],
                                  torch.float32, up)
        self.is_greedy = upload(self.greedy, torch.bool, up)
        self.top_p = upload([p.top_p for p in params], torch.float32, up) if self.any_top_p[-1] else None
        self.top_k = upload([p.top_k if p.top_k > 0 else vocab for p in params], torch.int64, up) \
            if self.any_top_k[-1] else None
        self.min_p = upload([p.min_p for p in params], torch.float32, up) if self.any_min_p[-1] else None
        self.generators = {
            i: draft.generator(r.request_id, p.seed)
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


def upload(values: list, dtype: torch.dtype, to_device: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A small host list -> device tensor without waiting for the device (the runner's staging)."""
    return to_device(torch.tensor(values, dtype=dtype))
