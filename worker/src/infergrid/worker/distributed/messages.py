"""Control messages from rank 0 to ranks 1..N-1: one fixed-size struct each, never pickled.

A step travels as one message over each rank's pipe: the header, then the step's inputs as raw
int64s (a few hundred bytes for a decode step), which every rank uploads to its own GPU. So an idle
follower waits in a plain `recv`, not in a collective that could time out, and no rank's GPU stream
waits on another's before the forward pass's first all-reduce (an NCCL broadcast of the inputs did,
and cost each rank a collective launch per step). The flat layout, with T tokens, B sequences, W
block-table columns, L sampling rows and P placeholder input tokens (async scheduling: token index,
and the row of the previous step's sampled tokens, broadcast by rank 0, that fills it in):

    [ input_ids T | positions T | slot_mapping T | query_start_loc B+1 | seq_lens B | block_tables B*W |
      logits_indices L | placeholder_positions P | placeholder_rows P ]

NOTE: rank 0 decides everything that changes which collectives a step issues (the step id, which
CUDA graph to replay and at which padded batch size; at INIT_KV_CACHE which graphs to capture), so
the followers never take such a decision on their own and cannot diverge from it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np

_NUM_FIELDS = 10
_FORMAT = f"<{1 + _NUM_FIELDS}q"
MESSAGE_SIZE = struct.calcsize(_FORMAT)


class Command(enum.IntEnum):
    EXECUTE = 1  # run one step: a StepHeader, then the flat inputs, in the same message
    INIT_KV_CACHE = 2  # size and allocate the KV cache, capture the GraphPlan's CUDA graphs (collective)
    SHUTDOWN = 3  # release CUDA graphs, leave the group and exit 0


class GraphKind(enum.IntEnum):
    """How a step's forward pass runs (the same on every rank)."""

    EAGER = 0
    DECODE = 1  # runner/cuda_graph.py CUDAGraphRunner, max_query_len 1: one query token per sequence
    MULTI_TOKEN = 2  # the same class, max_query_len 1 + k: up to that many query tokens per sequence


@dataclass(frozen=True)
class GraphPlan:
    """Which CUDA graphs every rank captures (0 = none of that kind)."""

    decode_max_batch_size: int = 0
    multi_token_max_batch_size: int = 0
    multi_token_max_query_len: int = 0

    @property
    def has_graphs(self) -> bool:
        return self.decode_max_batch_size > 0 or self.multi_token_max_batch_size > 0


@dataclass(frozen=True)
class StepHeader:
    """Sizes and host-side scalars of one step's inputs (see the module docstring), the step's id
    (1, 2, ... on rank 0) and the CUDA graph it replays (`graph_key`: the key in that kind's GraphSet)."""

    num_tokens: int
    num_seqs: int
    num_block_columns: int
    num_logits: int
    max_query_len: int
    max_seq_len: int
    step_id: int = 0
    graph_kind: GraphKind = GraphKind.EAGER
    graph_key: int = 0
    num_placeholders: int = 0

    def split_sizes(self) -> list[int]:
        """Lengths of the flat tensor's parts, in layout order."""
        t, b, p = self.num_tokens, self.num_seqs, self.num_placeholders
        return [t, t, t, b + 1, b, b * self.num_block_columns, self.num_logits, p, p]

    @property
    def flat_size(self) -> int:
        return sum(self.split_sizes())


Payload = StepHeader | GraphPlan | None


def pack(command: Command, payload: Payload = None, inputs: np.ndarray | None = None) -> bytes:
    """One message: MESSAGE_SIZE bytes; EXECUTE carries a StepHeader and then its flat `inputs`
    (header.flat_size int64s), INIT_KV_CACHE a GraphPlan."""
    if command is Command.EXECUTE:
        if not isinstance(payload, StepHeader):
            raise TypeError("EXECUTE needs a StepHeader")
        h = payload
        fields = [h.num_tokens, h.num_seqs, h.num_block_columns, h.num_logits, h.max_query_len, h.max_seq_len,
                  h.step_id, int(h.graph_kind), h.graph_key, h.num_placeholders]
    elif command is Command.INIT_KV_CACHE:
        p = payload if isinstance(payload, GraphPlan) else GraphPlan()
        fields = [p.decode_max_batch_size, p.multi_token_max_batch_size, p.multi_token_max_query_len]
    else:
        fields = []
    data = struct.pack(_FORMAT, int(command), *fields, *[0] * (_NUM_FIELDS - len(fields)))
    if command is Command.EXECUTE:
        assert isinstance(payload, StepHeader)
        if inputs is None or inputs.size != payload.flat_size:
            raise ValueError(f"EXECUTE needs the step's {payload.flat_size} flat inputs")
        data += inputs.astype("<i8", copy=False).tobytes()
    return data


def unpack(data: bytes) -> tuple[Command, Payload]:
    """Inverse of `pack` (for EXECUTE, `step_inputs` reads the inputs); raises ValueError for a
    message of the wrong size, command or graph kind."""
    if len(data) < MESSAGE_SIZE:
        raise ValueError(f"control message must be at least {MESSAGE_SIZE} bytes, got {len(data)}")
    command_value, *fields = struct.unpack_from(_FORMAT, data)
    command = Command(command_value)
    if command is Command.EXECUTE:
        *sizes, step_id, kind, graph_key, num_placeholders = fields
        header = StepHeader(*sizes, step_id=step_id, graph_kind=GraphKind(kind), graph_key=graph_key,
                            num_placeholders=num_placeholders)
        if len(data) != MESSAGE_SIZE + 8 * header.flat_size:
            raise ValueError(f"step message must carry {header.flat_size} inputs, got {len(data) - MESSAGE_SIZE} bytes")
        return command, header
    if len(data) != MESSAGE_SIZE:
        raise ValueError(f"control message must be {MESSAGE_SIZE} bytes, got {len(data)}")
    if command is Command.INIT_KV_CACHE:
        return command, GraphPlan(*fields[:3])
    return command, None


def step_inputs(data: bytes) -> np.ndarray:
    """The flat int64 inputs of an EXECUTE message (a writable copy)."""
    return np.frombuffer(data, dtype="<i8", offset=MESSAGE_SIZE).astype(np.int64)
