"""A step's inputs: scheduled requests -> one flat int64 array (and the TP StepHeader) -> device tensors.

Rank 0 flattens the scheduled requests on the host (`flatten_step`) into the layout of
distributed/messages.py, which is also what it sends the other tensor-parallel ranks:

    [ input_ids T | positions T | slot_mapping T | query_start_loc B+1 | seq_lens B | block_tables B*W |
      logits_indices L | placeholder_positions P | placeholder_rows P ]

Every rank uploads it in one copy and views it as a BatchInputs (`batch_from_flat`). Async scheduling:
an input token the previous step is still sampling (PLACEHOLDER_TOKEN_ID) is filled in on the device
from that step's sampled tokens (placeholder_rows: its row there). Drafts the draft model left on
the device (DRAFT_PLACEHOLDER_ID) are the speculator's to fill in (`FlatStep.device_drafts`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from infergrid.worker.distributed.messages import GraphKind, StepHeader
from infergrid.worker.engine.scheduler_output import (
    DRAFT_PLACEHOLDER_ID,
    PLACEHOLDER_TOKEN_ID,
    ScheduledRequest,
)
from infergrid.worker.layers.attention import AttentionMetadata

# (num_seqs, num_tokens, max_query_len, num_block_columns) -> (graph kind, graph key)
GraphChooser = Callable[[int, int, int, int], tuple[GraphKind, int]]


@dataclass
class BatchInputs:
    """One step's device inputs (layers/attention.py describes the flat batch layout)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    is_uniform_decode: bool
    step_id: int = 0
    graph_kind: GraphKind = GraphKind.EAGER
    graph_key: int = 0  # which graph of that kind (runner/cuda_graph.py: a packed (batch size, tokens) key)


@dataclass
class DeviceDrafts:
    """Input positions whose tokens are drafts still on the device: position i takes draft
    `draft_indices[i]` of request `request_ids[i]`."""

    positions: np.ndarray
    request_ids: list[str]
    draft_indices: np.ndarray


@dataclass
class FlatStep:
    """A step flattened on the host: its header, its flat int64 inputs and its drafts on the device."""

    header: StepHeader
    flat: np.ndarray
    device_drafts: DeviceDrafts | None


def flatten_step(scheduled: list[ScheduledRequest], block_size: int, step_id: int,
                 prev_rows: dict[str, int], choose_graph: GraphChooser) -> FlatStep:
    """Rank 0's step `step_id` (see the module docstring). `prev_rows`: each request's row in the
    previous step's sampled tokens (where its placeholder input token comes from)."""
    bs = block_size
    num_seqs = len(scheduled)
    q_lens = np.fromiter((s.num_new_tokens for s in scheduled), dtype=np.int64, count=num_seqs)
    starts = np.fromiter((s.num_computed_tokens for s in scheduled), dtype=np.int64, count=num_seqs)
    qsl = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(q_lens, out=qsl[1:])
    total = int(qsl[-1])
    input_ids = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in scheduled), np.int64, total)
    block_tables = np.zeros((num_seqs, max(len(s.block_ids) for s in scheduled)), dtype=np.int64)
    for i, s in enumerate(scheduled):
        block_tables[i, : len(s.block_ids)] = s.block_ids
    seq_of_token = np.repeat(np.arange(num_seqs), q_lens)
    positions = starts[seq_of_token] + np.arange(total) - qsl[:-1][seq_of_token]
    slot_mapping = block_tables[seq_of_token, positions // bs] * bs + positions % bs
    logits_indices = [
        j for s, end in zip(scheduled, qsl[1:].tolist(), strict=True) if s.needs_sample
        for j in range(end - 1 - len(s.spec_token_ids), end)
    ]
    seq_lens = starts + q_lens
    max_query_len = int(q_lens.max())
    placeholders = np.flatnonzero(input_ids == PLACEHOLDER_TOKEN_ID)
    draft_positions = np.flatnonzero(input_ids == DRAFT_PLACEHOLDER_ID)
    try:  # each placeholder's row in the previous step's sampled tokens
        placeholder_rows = [prev_rows[scheduled[i].request_id] for i in seq_of_token[placeholders].tolist()]
    except KeyError as exc:
        raise RuntimeError(f"request {exc.args[0]!r} has a placeholder input token, but sampled nothing "
                           "in the previous step") from None
    graph_kind, graph_key = choose_graph(num_seqs, total, max_query_len, block_tables.shape[1])
    header = StepHeader(
        num_tokens=total, num_seqs=num_seqs, num_block_columns=block_tables.shape[1],
        num_logits=len(logits_indices), max_query_len=max_query_len, max_seq_len=int(seq_lens.max()),
        step_id=step_id, graph_kind=graph_kind, graph_key=graph_key, num_placeholders=len(placeholders),
    )
    # NOTE: the order is the flat layout of distributed/messages.py.
    flat = concat_int64([input_ids, positions, slot_mapping, qsl, seq_lens, block_tables,
                         np.asarray(logits_indices, dtype=np.int64), placeholders,
                         np.asarray(placeholder_rows, dtype=np.int64)])
    device_drafts = None
    if draft_positions.size:
        seqs = seq_of_token[draft_positions]
        spec_lens = np.fromiter((len(s.spec_token_ids) for s in scheduled), dtype=np.int64, count=num_seqs)
        device_drafts = DeviceDrafts(draft_positions, [scheduled[i].request_id for i in seqs.tolist()],
                                     draft_positions - (qsl[1:][seqs] - spec_lens[seqs]))
    return FlatStep(header, flat, device_drafts)


def batch_from_flat(header: StepHeader, flat: torch.Tensor, block_size: int,
                    prev_sampled: torch.Tensor | None, rank: int = 0) -> BatchInputs:
    """Device tensors of one step from its flat int64 inputs (views, plus int32 casts), with the
    placeholder input tokens taken from `prev_sampled`, the previous step's sampled tokens."""
    (input_ids, positions, slots, qsl, seq_lens, tables, logits_indices, placeholders,
     placeholder_rows) = flat.split(header.split_sizes())
    if header.num_placeholders:
        if prev_sampled is None:
            raise RuntimeError(f"rank {rank}: step {header.step_id} has placeholder input tokens, "
                               "but no earlier step sampled")
        input_ids[placeholders] = prev_sampled[placeholder_rows]
    tables = tables.view(header.num_seqs, header.num_block_columns)
    if header.graph_kind is GraphKind.EAGER:  # (a graph's inputs are cast as they are staged: graph_inputs.py)
        qsl, seq_lens, tables = qsl.to(torch.int32), seq_lens.to(torch.int32), tables.to(torch.int32)
    meta = AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=qsl,
        seq_lens=seq_lens,
        block_tables=tables,
        max_query_len=header.max_query_len,
        max_seq_len=header.max_seq_len,
        block_size=block_size,
    )
    return BatchInputs(
        input_ids=input_ids,
        positions=positions,
        meta=meta,
        logits_indices=logits_indices,
        is_uniform_decode=header.max_query_len == 1,
        step_id=header.step_id,
        graph_kind=header.graph_kind,
        graph_key=header.graph_key,
    )


def logits_rows(hidden: torch.Tensor, batch: BatchInputs) -> torch.Tensor:
    """The hidden states of the rows that sample. Every row, in order, when there are as many as
    tokens (decode, verification without prefill chunks): then no gather is launched."""
    if batch.logits_indices.shape[0] == hidden.shape[0]:
        return hidden
    return hidden[batch.logits_indices]


def concat_int64(arrays: list[np.ndarray]) -> np.ndarray:
    """Integer arrays -> one flat int64 array (in order)."""
    return np.concatenate([a.reshape(-1).astype(np.int64, copy=False) for a in arrays])
