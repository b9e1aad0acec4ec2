"""What the runner asks of speculative decoding, as a Protocol: the runner never imports spec_decode/.

The executor builds the speculator (spec_decode.SpeculativeDecoder, around the rank-0 runner) and
hands it to the runner (`ModelRunner.speculator`); the engine gets it from the executor. Within a
step, the runner calls it three times:

    prepare_inputs   fill_drafts     input tokens that are drafts still on the device (DRAFT_PLACEHOLDER_ID)
    sample           verify          rejection-sample the rows of requests with drafts
    after sampling   propose_ahead   queue the next drafts behind this step on the device
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from infergrid.worker.runner.sampling_metadata import SampleRow
from infergrid.worker.sample.sampler import SamplerOutput, SamplingMetadata


class Speculator(Protocol):
    """The speculative-decoding hooks of one step (see the module docstring)."""

    def fill_drafts(self, input_ids: torch.Tensor, positions: np.ndarray, request_ids: list[str],
                    draft_indices: np.ndarray) -> None:
        """Set input_ids[positions[i]] to draft `draft_indices[i]` of request `request_ids[i]` (on the device)."""

    def verify(self, logits: torch.Tensor, meta: SamplingMetadata, rows: Sequence[SampleRow]) -> SamplerOutput:
        """Sample rows that include draft positions; a row after its request's first rejection gets -1."""

    def propose_ahead(self, rows: Sequence[SampleRow], sampled: torch.Tensor) -> None:
        """Right after a verification is launched: start the next proposal behind it."""

    def remove_requests(self, request_ids: set[str]) -> None:
        """Forget finished requests."""
