"""What a step gives back: per request, its new tokens and their logprobs, on their way to the host.

`ModelRunner.execute_model` only launches a step. Its sampled tokens are copied to pinned host memory
behind a CUDA event, and `PendingRunnerOutput.result()` waits for that event alone, so the engine
schedules and launches the next step while this one runs (async scheduling).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from infergrid.worker.runner.sampling_metadata import SampleRow
from infergrid.worker.sample.sampler import SamplerOutput


@dataclass
class TokenLogprobs:
    """Logprobs of one sampled token: `token_ids[0]` is the sampled token, then the top-k."""

    token_ids: list[int]
    logprobs: list[float]
    sampled_rank: int


@dataclass
class ModelRunnerOutput:
    """Per request that sampled: its new token ids (accepted drafts + one) and their logprobs."""

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


class PendingRunnerOutput:
    """A launched step's output on its way to the host; `result()` waits for this step only (later
    steps queued on the device keep running)."""

    def __init__(self, rows: list[SampleRow] | None = None, out: SamplerOutput | None = None) -> None:
        self._rows, self._output = rows or [], None if out is not None else ModelRunnerOutput()
        self._host: list[torch.Tensor | None] = []
        self._event: torch.cuda.Event | None = None
        if out is not None:
            tensors = [out.sampled, out.logprob_token_ids, out.logprobs, out.sampled_ranks]
            is_cuda = out.sampled.is_cuda
            self._host = [None if t is None else t.to("cpu", non_blocking=is_cuda) for t in tensors]
            if is_cuda:
                self._event = torch.cuda.Event()
                self._event.record()

    def result(self) -> ModelRunnerOutput:
        """The step's tokens (and logprobs); blocks until they are on the host."""
        if self._output is None:
            if self._event is not None:
                self._event.synchronize()
            self._output = make_output(self._rows, *self._host)  # type: ignore[arg-type]
        return self._output


def make_output(rows: list[SampleRow], sampled_t: torch.Tensor, lp_ids_t: torch.Tensor | None,
                lp_vals_t: torch.Tensor | None, ranks_t: torch.Tensor | None) -> ModelRunnerOutput:
    """Per request: its sampled tokens up to and including the first rejected draft (host tensors;
    the verifier set the rows after it to -1)."""
    sampled = sampled_t.tolist()
    lp_ids = lp_ids_t.tolist() if lp_ids_t is not None else None
    lp_vals = lp_vals_t.tolist() if lp_vals_t is not None else None
    ranks = ranks_t.tolist() if ranks_t is not None else None
    result = ModelRunnerOutput()
    for i, row in enumerate(rows):
        req_id = row.sched.request_id
        if sampled[i] < 0:
            continue
        tokens = result.sampled_token_ids.setdefault(req_id, [])
        tokens.append(sampled[i])
        if lp_ids is not None and row.sched.request.sampling_params.logprobs is not None:
            k = row.sched.request.sampling_params.logprobs
            entry = TokenLogprobs(lp_ids[i][: 1 + k], lp_vals[i][: 1 + k], ranks[i])  # type: ignore[index]
            result.logprobs.setdefault(req_id, []).append(entry)
    return result
