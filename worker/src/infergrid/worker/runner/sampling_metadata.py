"""A step's sampling rows and their SamplingMetadata (sample/sampler.py), built on the host.

Every request that samples gets one row per draft token plus one (a request without drafts: one
row); row j of a request is sampled after its drafts 0..j-1. The metadata is built before the forward
pass is launched, so its small host-to-device copies do not wait for the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from infergrid.worker.engine.scheduler_output import ScheduledRequest
from infergrid.worker.sample.sampler import SamplingMetadata
from infergrid.worker.sampling_params import SamplingParams


@dataclass
class SampleRow:
    """One sampling position of a scheduled request."""

    sched: ScheduledRequest
    draft_index: int  # 0 .. len(spec_token_ids): which of the request's sampling positions


def sample_rows(scheduled: list[ScheduledRequest]) -> list[SampleRow]:
    """The step's rows, in the order of the logits (request by request, draft position by position)."""
    return [SampleRow(s, j) for s in scheduled if s.needs_sample for j in range(len(s.spec_token_ids) + 1)]


class SamplingMetadataBuilder:
    """Builds each step's SamplingMetadata; owns the per-request seeded generators.

    Args:
        device: where the sampler runs.
        vocab_size: the model's vocabulary (top_k off = vocab_size; banned ids beyond it are dropped).
        eos_token_ids: banned while a request is below its min_tokens (unless ignore_eos).
        to_device: uploads a small host tensor without waiting for the device (host_staging.py).
    """

    def __init__(self, device: torch.device, vocab_size: int, eos_token_ids: list[int],
                 to_device: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.to_device = to_device
        self.generators: dict[str, torch.Generator] = {}

    def remove_requests(self, request_ids: set[str]) -> None:
        for req_id in request_ids:
            self.generators.pop(req_id, None)

    def build(self, rows: list[SampleRow]) -> SamplingMetadata:
        params: list[SamplingParams] = [r.sched.request.sampling_params for r in rows]
        floats = self._float_tensor
        greedy = [p.is_greedy for p in params]
        all_greedy = all(greedy)
        temperature = None if all_greedy else floats([0.0 if g else p.temperature
                                                      for g, p in zip(greedy, params, strict=True)])
        meta = SamplingMetadata(temperature=temperature, all_greedy=all_greedy)
        if not meta.all_greedy:
            if any(p.top_p < 1.0 for p in params):
                meta.top_p = floats([p.top_p for p in params])
            if any(p.top_k > 0 for p in params):
                meta.top_k = self.to_device(torch.tensor([p.top_k if p.top_k > 0 else self.vocab_size
                                                          for p in params]))
            if any(p.min_p > 0 for p in params):
                meta.min_p = floats([p.min_p for p in params])
        if any(p.has_penalties for p in params):  # (the engine resolves the previous step first: no placeholders)
            # (rows without penalties need no history: their drafts may still be on the device)
            meta.output_token_ids = [r.sched.request.output_token_ids + r.sched.spec_token_ids[: r.draft_index]
                                     if p.has_penalties else [] for r, p in zip(rows, params, strict=True)]
            if any(p.presence_penalty for p in params):
                meta.presence_penalty = floats([p.presence_penalty for p in params])
            if any(p.frequency_penalty for p in params):
                meta.frequency_penalty = floats([p.frequency_penalty for p in params])
            if any(p.repetition_penalty != 1.0 for p in params):
                meta.repetition_penalty = floats([p.repetition_penalty for p in params])
                meta.prompt_token_ids = [r.sched.request.prompt_token_ids for r in rows]
        for i, (row, p) in enumerate(zip(rows, params, strict=True)):
            if p.seed is not None and not greedy[i]:
                meta.generators[i] = self._generator(row.sched.request_id, p.seed)
            request = row.sched.request
            # Output tokens before this row's: the known ones, those still being sampled by the previous
            # step (async scheduling: every placeholder but this step's own), the drafts before it.
            num_before = request.num_output_tokens + max(request.num_output_placeholders - 1, 0) + row.draft_index
            if num_before < p.min_tokens:
                banned = list(p.stop_token_ids or ()) + ([] if p.ignore_eos else self.eos_token_ids)
                banned = [t for t in banned if t < self.vocab_size]
                if banned:
                    meta.banned_token_ids[i] = banned
        if any(p.logprobs is not None for p in params):
            meta.max_num_logprobs = max(p.logprobs or 0 for p in params)
        return meta

    def _float_tensor(self, values: list[float]) -> torch.Tensor:
        return self.to_device(torch.tensor(values, dtype=torch.float32))

    def _generator(self, request_id: str, seed: int) -> torch.Generator:
        gen = self.generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self.generators[request_id] = gen
        return gen
