"""Control messages from rank 0 to ranks 1..N-1: one fixed-size struct each, never pickled.

A step travels in two parts: this header over the rank's pipe (so an idle follower waits in a plain
`recv`, not in a collective that could time out), then one flat int64 tensor with the step's inputs
by `broadcast` (NCCL on GPU, gloo on CPU). The flat layout, with T tokens, B sequences, W block-table
columns and L sampling rows:

    [ input_ids T | positions T | slot_mapping T | query_start_loc B+1 | seq_lens B | block_tables B*W | logits_indices L ]
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

_FORMAT = "<8q"
MESSAGE_SIZE = struct.calcsize(_FORMAT)


class Command(enum.IntEnum):
    EXECUTE = 1  # run one step; a StepHeader follows, then the flat inputs by broadcast
    INIT_KV_CACHE = 2  # size and allocate the KV cache (collective: profile run, min over ranks)
    SHUTDOWN = 3  # leave the group and exit 0


@dataclass(frozen=True)
class StepHeader:
    """Sizes and host-side scalars of one step's inputs (see the module docstring)."""

    num_tokens: int
    num_seqs: int
    num_block_columns: int
    num_logits: int
    max_query_len: int
    max_seq_len: int

    def split_sizes(self) -> list[int]:
        """Lengths of the flat tensor's parts, in layout order."""
        t, b = self.num_tokens, self.num_seqs
        return [t, t, t, b + 1, b, b * self.num_block_columns, self.num_logits]

    @property
    def flat_size(self) -> int:
        return sum(self.split_sizes())


_EMPTY = StepHeader(0, 0, 0, 0, 0, 0)


def pack(command: Command, header: StepHeader = _EMPTY) -> bytes:
    """One message as MESSAGE_SIZE bytes."""
    h = header
    return struct.pack(_FORMAT, int(command), h.num_tokens, h.num_seqs, h.num_block_columns, h.num_logits,
                       h.max_query_len, h.max_seq_len, 0)


def unpack(data: bytes) -> tuple[Command, StepHeader]:
    """Inverse of `pack`; raises ValueError for a message of the wrong size or command."""
    if len(data) != MESSAGE_SIZE:
        raise ValueError(f"control message must be {MESSAGE_SIZE} bytes, got {len(data)}")
    command, *fields, _ = struct.unpack(_FORMAT, data)
    return Command(command), StepHeader(*fields)
