"""A draft proposal's passes 2..k: decode passes of the same rows, each reading the previous pass's drafts.

After pass 1 (the catch-up, which gives each proposing request its first draft d1):

    pass j>1:  d_{j-1} at position num_tokens - 2 + j (a decode pass)  -> logits -> d_j

Their inputs are built and uploaded once (`later_pass_inputs`), each pass reads the previous pass's
drafts on the device, and the host never waits: the drafts stay on the device for the target's next
step (DraftBatch). When every row is greedy, passes 2..k are one CUDA graph replay (draft_loop_graph.py),
LM heads and argmaxes included; otherwise the draft runner's decode graphs replay back to back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from infergrid.worker.spec_decode.draft_loop_graph import slot_mapping_of
from infergrid.worker.spec_decode.draft_model import DraftModel
from infergrid.worker.spec_decode.draft_sampler import DraftSampler


@dataclass
class LaterPasses:
    """Device inputs of draft passes 2..k ([pass, row] for the per-pass ones); `rows[p]` is
    (number of rows that draft at pass p + 2, their max seq len)."""

    rows: list[tuple[int, int]]
    positions: torch.Tensor  # int64 [passes, rows]
    slot_mapping: torch.Tensor  # int64 [passes, rows]
    seq_lens: torch.Tensor  # int32 [passes, rows]
    query_start_loc: torch.Tensor  # int32 [rows + 1] (0, 1, 2, ...)
    block_tables: torch.Tensor  # int32 [rows, width]


def later_pass_inputs(draft: DraftModel, num_tokens: list[int], tables: list[list[int]],
                      num_drafts: list[int]) -> LaterPasses:
    """Device inputs of passes 2..k for rows ordered by num_drafts (descending): pass j feeds
    row i's draft d_{j-1} at position num_tokens - 2 + j, for the rows with num_drafts >= j."""
    bs = draft.block_size
    num_rows, num_passes = len(num_tokens), num_drafts[0] - 1
    width = max(len(t) for t in tables)
    block_tables = np.zeros((num_rows, width), dtype=np.int64)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = t
    positions = np.asarray(num_tokens, dtype=np.int64)[None, :] + np.arange(num_passes)[:, None]  # [passes, rows]
    columns = np.minimum(positions // bs, width - 1)  # (rows past their last pass: never read)
    slot_mapping = block_tables[np.arange(num_rows)[None, :], columns] * bs + positions % bs
    drafting = np.asarray(num_drafts)[None, :] > np.arange(1, num_passes + 1)[:, None]
    rows = [(n, int(positions[j, :n].max()) + 1) for j, n in enumerate(drafting.sum(axis=1).tolist())]
    flat = draft.runner.upload_arrays([positions, slot_mapping, positions + 1, np.arange(num_rows + 1),
                                       block_tables])
    sizes = [positions.size] * 3 + [num_rows + 1, block_tables.size]
    pos, slots, seq_lens, qsl, tab = flat.split(sizes)
    return LaterPasses(
        rows=rows,
        positions=pos.view(num_passes, num_rows),
        slot_mapping=slots.view(num_passes, num_rows),
        seq_lens=seq_lens.view(num_passes, num_rows).to(torch.int32),
        query_start_loc=qsl.to(torch.int32),
        block_tables=tab.view(num_rows, width).to(torch.int32),
    )


def passes_from(draft: DraftModel, first: torch.Tensor, q: torch.Tensor | None, sampler: DraftSampler,
                start: torch.Tensor, tables: torch.Tensor,
                max_seq_len: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Passes 2..k of n rows that all draft k tokens, whose first drafts are `first` [n] (sampled
    from `q` [n, V], None when all rows are greedy) and go at positions `start` [n] (device
    tensors both); `tables` [n, W] int64 block tables covering them; `max_seq_len` bounds their
    lengths. Returns drafts [n, k] and, per sampled row, its draft distributions [k, V]."""
    n, k = first.shape[0], draft.max_k
    runner = draft.runner
    tables32 = tables.to(torch.int32)
    loop = draft.loop_graphs
    if q is None and k > 1 and loop is not None and loop.fits(n, tables.shape[1]):
        return loop.run(first, start, tables32), {}
    pass_probs = [q]
    positions = start[:, None] + torch.arange(k - 1, device=runner.device)  # [n, k - 1]
    slots = slot_mapping_of(tables, positions, draft.block_size).T.contiguous()
    positions = positions.T.contiguous()
    seq_lens = (positions + 1).to(torch.int32)
    query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=runner.device)
    drafts = [first]
    for j in range(k - 1):
        batch = runner.decode_batch(drafts[-1], positions[j], slots[j], query_start_loc, seq_lens[j], tables32,
                                    max_seq_len)
        tokens, q = sampler.sample(runner.compute_logits(runner.forward(batch)), n)
        drafts.append(tokens)
        pass_probs.append(q)
    probs = {i: torch.stack([p[i] for p in pass_probs]) for i in range(n) if not sampler.greedy[i]}  # type: ignore[index]
    return torch.stack(drafts, dim=1), probs
