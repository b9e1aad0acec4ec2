"""What crosses between the speculative decoder and the draft model: requests in, drafts out (data only).

    DraftRequest  a request that proposes this step (its block table: the target's)
    DraftBatch    one proposal step's drafts, left on the device for the target's next step
    AheadRequest  a request verifying drafts in the step just launched (proposals made ahead)
    AheadDrafts   the drafts proposed ahead of that verification, and what they assumed
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infergrid.worker.engine.request import Request


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
