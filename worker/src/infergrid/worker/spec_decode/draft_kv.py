"""Which draft KV is valid: per block of the target's ids, the leading slots that match the target's tokens.

The draft model's KV pool mirrors the target's block ids (draft_model.py), so the draft reads and
writes a request's KV through the target's block table. The target writes KV for every token it
computes (prefills, drafts, rejected drafts); the draft computes lazily, only for requests that
propose, so it keeps per block the number of leading slots whose draft KV matches the target's
tokens (`valid`):

    a target write at offset o of a block    truncates that block's count to o
    a draft catch-up                          extends it, up to the target's computed tokens

A request's draft context is the longest prefix of its block table that is valid, so preemption,
prefix-cache hits (a hit block keeps the draft KV it had), rewinds of rejected tokens and requests
that stopped speculating for a while all come out right: the draft just catches up from there. Draft
KV past the target's computed tokens is speculative and never counted as valid.
"""

from __future__ import annotations

import numpy as np

from infergrid.worker.engine.scheduler_output import SchedulerOutput


class DraftKVValidity:
    """Valid draft KV slots per block id (see the module docstring)."""

    def __init__(self, block_size: int, num_blocks: int = 0) -> None:
        self.block_size = block_size
        self.valid = np.zeros(num_blocks, dtype=np.int64)

    def reset(self, num_blocks: int) -> None:
        """No draft KV is valid in any of `num_blocks` blocks."""
        self.valid = np.zeros(num_blocks, dtype=np.int64)

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

    def mark_valid(self, block_ids: list[int], start: int, end: int) -> None:
        """Draft KV now matches the target's for positions [start, end) (start is the valid prefix)."""
        bs = self.block_size
        pos = start
        while pos < end:
            b = block_ids[pos // bs]
            stop = min(end, (pos // bs + 1) * bs)
            self.valid[b] = stop - (pos // bs) * bs
            pos = stop
