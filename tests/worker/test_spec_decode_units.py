"""Speculative-decoding parts on their own: n-gram lookup, the adaptive number of drafts, and the
draft model's per-block KV validity bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from infergrid.worker.spec_decode.adaptive import AdaptiveNumDrafts, best_num_drafts, expected_tokens
from infergrid.worker.spec_decode.ngram_proposer import NgramProposer


@pytest.mark.parametrize(
    ("tokens", "k", "drafts"),
    [
        ([1, 2, 3, 4, 5, 9, 2, 3, 4], 3, [5, 9, 2]),  # longest suffix "2 3 4" recurs
        ([9, 9, 1, 2, 3, 1, 2, 3, 0, 2, 3], 2, [0, 2]),  # most recent "2 3", not the first
        ([7, 7, 7, 7], 4, [7, 7, 7, 7]),  # a loop continues with its period
        ([5, 1, 2, 3, 1, 2], 4, [3, 1, 2, 3]),
        ([1, 2, 3], 3, []),  # nothing recurs
        ([4, 8, 1, 4, 8], 2, [1, 4]),
        ([4, 8, 1, 4, 8], 0, []),
    ],
)
def test_ngram_lookup(tokens, k, drafts):
    assert NgramProposer().propose(tokens, k) == drafts


def test_ngram_prefers_the_longest_match_and_keeps_a_growing_buffer():
    p = NgramProposer(min_n=1, max_n=3)
    # "3" alone last occurred before 9, but "2 3" occurred before 4: the longer match wins.
    assert p.propose([1, 2, 3, 4, 0, 3, 9, 2, 3], 1, "r") == [4]
    assert p.propose([1, 2, 3, 4, 0, 3, 9, 2, 3, 4], 2, "r") == [0, 3]  # only the new token is appended
    p.remove("r")
    assert p.propose([5, 6, 5], 2, "r") == [6, 5]


def test_expected_tokens_and_best_k():
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-12
    assert best_num_drafts(1.0, 4, 0.05) == 4
    assert best_num_drafts(0.02, 4, 0.1) == 0  # acceptance below the cost: off
    assert best_num_drafts(0.9, 8, 0.3) < 8  # an expensive draft stops earlier


def test_adaptive_turns_off_probes_with_backoff_and_comes_back():
    a = AdaptiveNumDrafts(max_k=4, draft_cost=0.1)
    assert a.num_drafts("r") == 4  # optimistic prior
    for _ in range(6):
        a.observe("r", 4, 0)
    assert a.acceptance_rate("r") < 0.1
    ks = [a.num_drafts("r") for _ in range(12)]
    assert ks == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]  # probes after 4 steps, then 8
    for _ in range(3):
        a.observe("r", 1, 1)  # the text became predictable
    assert a.num_drafts("r") >= 2
    a.remove("r")
    assert a.acceptance_rate("r") == pytest.approx(0.7)
    assert AdaptiveNumDrafts(max_k=3, draft_cost=5.0, enabled=False).num_drafts("x") == 3


class _FakeSched:
    def __init__(self, start: int, num_new: int, block_ids: list[int]) -> None:
        self.num_computed_tokens, self.num_new_tokens, self.block_ids = start, num_new, block_ids


class _FakeOutput:
    def __init__(self, *scheduled: _FakeSched) -> None:
        self.scheduled = list(scheduled)


def test_draft_kv_validity_follows_target_writes_and_catch_ups():
    """valid[block] = leading slots whose draft KV matches the target's tokens (block size 4)."""
    from infergrid.worker.spec_decode.draft_proposer import DraftProposer

    d = DraftProposer.__new__(DraftProposer)  # only the bookkeeping, no model
    d.block_size, d.valid = 4, np.zeros(10, dtype=np.int64)
    table = [7, 2, 9]
    assert d.valid_prefix(table, 11) == 0
    d._mark_valid(table, 0, 10)  # draft caught up positions 0..9
    assert d.valid[[7, 2, 9]].tolist() == [4, 4, 2] and d.valid_prefix(table, 11) == 10
    assert d.valid_prefix(table, 6) == 6  # never past the target's computed tokens
    d.note_target_writes(_FakeOutput(_FakeSched(9, 3, table)))  # target wrote 9..11 (drafts)
    assert d.valid[9] == 1 and d.valid_prefix(table, 11) == 9
    d.note_target_writes(_FakeOutput(_FakeSched(0, 8, [2, 5])))  # block 2 reused by another request
    assert d.valid[2] == 0 and d.valid_prefix(table, 11) == 4
    d._mark_valid(table, 4, 11)
    assert d.valid_prefix(table, 11) == 11


def test_multi_token_graph_buffers_for_a_mixed_batch():
    """The CUDA-graph bookkeeping, on CPU with a stand-in for the captured graph: a batch of 3
    sequences with 1..4 query tokens lands in the 4-sequence bucket; real sequences keep their
    layout, dummies get 0 query tokens and seq_len 0, padding tokens write to the null block."""
    from types import SimpleNamespace

    import torch

    from infergrid.worker.layers.attention import AttentionMetadata
    from infergrid.worker.spec_decode.verify_graph import MultiTokenCUDAGraphRunner

    runner = SimpleNamespace(config=SimpleNamespace(max_num_seqs=8), device=torch.device("cpu"), block_size=4,
                             max_blocks_per_seq=6, max_model_len=24, dtype=torch.float32,
                             model_config=SimpleNamespace(hidden_size=2))
    graphs = MultiTokenCUDAGraphRunner(runner, max_query_len=4)
    seen = {}

    class FakeGraph:
        def __init__(self, bs: int) -> None:
            self.bs = bs

        def replay(self) -> None:  # what the captured forward reads and writes
            t = self.bs * 4
            seen.update(bs=self.bs, qsl=graphs.query_start_loc[: self.bs + 1].tolist(),
                        seq_lens=graphs.seq_lens[: self.bs].tolist(), slots=graphs.slot_mapping[:t].tolist())
            graphs.hidden[:t] = torch.stack([graphs.input_ids[:t], graphs.positions[:t]], dim=1).float()

    graphs.graphs = {bs: FakeGraph(bs) for bs in graphs.batch_sizes}
    q_lens, starts = [4, 1, 3], [5, 9, 0]
    ids = torch.arange(100, 108)
    positions = torch.cat([torch.arange(s, s + q) for s, q in zip(starts, q_lens, strict=True)])
    meta = AttentionMetadata(
        slot_mapping=positions + 40, query_start_loc=torch.tensor([0, 4, 5, 8], dtype=torch.int32),
        seq_lens=torch.tensor([9, 10, 3], dtype=torch.int32), block_tables=torch.ones(3, 3, dtype=torch.int32),
        max_query_len=4, max_seq_len=10, block_size=4,
    )
    batch = SimpleNamespace(input_ids=ids, positions=positions, meta=meta)
    assert graphs.can_run(batch)
    hidden = graphs.run(batch)
    assert hidden[:, 0].tolist() == ids.float().tolist() and hidden[:, 1].tolist() == positions.float().tolist()
    assert seen["bs"] == 4 and seen["qsl"] == [0, 4, 5, 8, 8] and seen["seq_lens"] == [9, 10, 3, 0]
    assert seen["slots"][:8] == (positions + 40).tolist() and seen["slots"][8:] == [0] * 8
    too_long = SimpleNamespace(input_ids=ids, positions=positions, meta=AttentionMetadata(
        slot_mapping=meta.slot_mapping, query_start_loc=torch.tensor([0, 5, 8], dtype=torch.int32),
        seq_lens=torch.tensor([10, 3], dtype=torch.int32), block_tables=meta.block_tables[:2],
        max_query_len=5, max_seq_len=10, block_size=4))
    assert not graphs.can_run(too_long)


def test_config_and_draft_compatibility_errors(tiny_model, tmp_path):
    from infergrid.worker import LLM
    from infergrid.worker.config import EngineConfig
    from infergrid.worker.tiny_model import make_tiny_model

    with pytest.raises(ValueError, match="'draft' does not support tensor_parallel_size > 1"):
        EngineConfig(model="m", speculative_method="draft", num_speculative_tokens=2, draft_model="d",
                     tensor_parallel_size=2)
    with pytest.raises(ValueError, match="draft_model vocabulary"):  # a different tokenizer
        LLM(tiny_model("llama"), dtype="float32", max_model_len=64, speculative_method="draft",
            num_speculative_tokens=2, draft_model=make_tiny_model(str(tmp_path / "v512"), vocab_size=512))
