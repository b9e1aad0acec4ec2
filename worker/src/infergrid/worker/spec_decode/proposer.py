"""Proposer: what SpeculativeDecoder asks of a drafter (ngram_proposer.py, draft_proposer.py).

Per engine step, for the rank-0 runner:

    launch_ahead(rows, sampled)    right after a verification is launched: a drafter that can, queues
                                   the next drafts behind it on the device (the draft model; n-gram: no-op)
    note_step(scheduler_output)    after the step was applied: the target wrote KV for its tokens
    propose_drafts(wanted, ...)    k drafts for each (request, k) the guard lets speculate

Drafts come back per request as token ids, or as DRAFT_PLACEHOLDER_IDs for drafts the drafter left on
the device (`device_drafts`): the runner fills those into the next step's input ids there, and the
verifier reads them (and, for sampled requests, their distributions q) from the same batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from infergrid.worker.engine.scheduler_output import ScheduledRequest, SchedulerOutput
    from infergrid.worker.spec_decode.draft_batch import DraftBatch


class Proposer(Protocol):
    """A drafter: proposes up to k tokens for the requests that speculate (see the module docstring)."""

    @property
    def device_drafts(self) -> DraftBatch | None:
        """The last proposal's drafts left on the device, or None (every draft went out as token ids)."""

    def kv_block_bytes(self) -> int:
        """KV bytes per block the drafter needs beside the target's (its pool mirrors the target's ids)."""

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the drafter's KV (if any) for a target pool of `num_blocks` blocks."""

    def remove_requests(self, request_ids: set[str]) -> None:
        """Forget finished requests."""

    def launch_ahead(self, rows: Sequence[Any], sampled: torch.Tensor) -> None:
        """A verification of `rows` (the runner's sample rows) was just launched, sampling `sampled`."""

    def note_step(self, scheduler_output: SchedulerOutput) -> None:
        """The step was applied (the target wrote KV for every scheduled token)."""

    def propose_drafts(self, wanted: list[tuple[ScheduledRequest, int]], unverified: set[str]) -> dict[str, list[int]]:
        """Drafts for (request, k) pairs (a request may get fewer, or none); `unverified`: requests that
        hold drafts of the previous proposal not verified yet (not scheduled since)."""
