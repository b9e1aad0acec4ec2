"""Speculative-decoding parts on their own: n-gram lookup, the draft model's per-block KV validity
bookkeeping, graph buffers, config errors and the FP8 draft head (the guard: test_spec_decode_guard.py)."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

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


def test_ngram_follows_a_quoted_passage_across_its_edits_and_stops_when_the_output_leaves_it():
    """The output rewrites a quoted passage in which every 7th token differs: the lookup alone misses
    for two steps after each edit (the bigrams around it recur nowhere), following proposes the
    passage's next tokens there too. An output that leaves the passage stops proposing."""
    rng = np.random.default_rng(1)
    chain = rng.permutation(np.arange(100, 1100))[:120].tolist()  # distinct tokens: no spurious matches
    quoted = [t if i % 7 else 5000 + i for i, t in enumerate(chain)]
    prompt = quoted + chain[:3]
    follower, lookup_only = NgramProposer(), NgramProposer()
    hits = {"follow": 0, "lookup": 0}
    for n in range(3, 100):
        tokens = prompt + chain[3:n]
        hits["follow"] += follower.propose(tokens, 1, "r") == [chain[n]]
        hits["lookup"] += lookup_only.propose(tokens, 1) == [chain[n]]
    edits = sum(1 for n in range(3, 100) if n % 7 == 0)
    assert hits["follow"] == 97 - edits  # wrong only where the passage itself is edited
    assert hits["lookup"] <= 97 - 3 * edits + 1  # also the two steps after each edit
    tokens = prompt + chain[3:40]
    assert follower.propose(tokens, 3, "r") == quoted[40:43]
    off_passage = tokens + rng.integers(2000, 3000, size=8).tolist()  # new text: half the window disagrees
    assert follower.propose(off_passage[:-4], 1, "r") != []
    assert follower.propose(off_passage, 1, "r") == []
    assert follower.propose(off_passage + [7], 1, "r") == []  # the alignment is gone
    follower.remove("r")


class _FakeSched:
    def __init__(self, start: int, num_new: int, block_ids: list[int]) -> None:
        self.num_computed_tokens, self.num_new_tokens, self.block_ids = start, num_new, block_ids


class _FakeOutput:
    def __init__(self, *scheduled: _FakeSched) -> None:
        self.scheduled = list(scheduled)


def test_draft_kv_validity_follows_target_writes_and_catch_ups():
    """valid[block] = leading slots whose draft KV matches the target's tokens (block size 4)."""
    from infergrid.worker.spec_decode.draft_kv import DraftKVValidity

    d = DraftKVValidity(block_size=4, num_blocks=10)
    table = [7, 2, 9]
    assert d.valid_prefix(table, 11) == 0
    d.mark_valid(table, 0, 10)  # draft caught up positions 0..9
    assert d.valid[[7, 2, 9]].tolist() == [4, 4, 2] and d.valid_prefix(table, 11) == 10
    assert d.valid_prefix(table, 6) == 6  # never past the target's computed tokens
    d.note_target_writes(_FakeOutput(_FakeSched(9, 3, table)))  # target wrote 9..11 (drafts)
    assert d.valid[9] == 1 and d.valid_prefix(table, 11) == 9
    d.note_target_writes(_FakeOutput(_FakeSched(0, 8, [2, 5])))  # block 2 reused by another request
    assert d.valid[2] == 0 and d.valid_prefix(table, 11) == 4
    d.mark_valid(table, 4, 11)
    assert d.valid_prefix(table, 11) == 11
    d.note_target_writes(_FakeOutput(_FakeSched(11, 1, table)))  # a decode inside block 9: nothing to reset
    assert d.valid_prefix(table, 12) == 11
    d.valid[4] = 3  # stale: block 4 held draft KV of an earlier request
    d.note_target_writes(_FakeOutput(_FakeSched(12, 1, [*table, 4])))  # a decode entering block 4
    assert d.valid[4] == 0 and d.valid_prefix([*table, 4], 13) == 11


def test_multi_token_graph_buffers_for_a_mixed_batch():
    """The CUDA-graph bookkeeping, on CPU with a stand-in for the captured graph: a batch of 3
    sequences with 1..4 query tokens (8 in all) lands in the 4-sequence bucket's 8-token graph
    (not its 16-token one); real sequences keep their layout, dummies get 0 query tokens and seq_len
    0, padding tokens write to the null block."""
    from types import SimpleNamespace

    import torch

    from infergrid.worker.layers.attention import AttentionMetadata
    from infergrid.worker.runner.cuda_graph import CUDAGraphRunner, unpack_key

    runner = SimpleNamespace(config=SimpleNamespace(max_num_seqs=8), device=torch.device("cpu"), block_size=4,
                             max_blocks_per_seq=6, max_model_len=24, dtype=torch.float32,
                             model_config=SimpleNamespace(hidden_size=2))
    graphs = CUDAGraphRunner(runner, max_query_len=4)
    seen = {}

    class FakeGraph:
        def __init__(self, key: int) -> None:
            self.bs, self.cap = unpack_key(key)

        def replay(self) -> None:  # what the captured forward reads and writes
            t = self.cap
            seen.update(bs=self.bs, cap=t, qsl=graphs.query_start_loc[: self.bs + 1].tolist(),
                        seq_lens=graphs.seq_lens[: self.bs].tolist(), slots=graphs.slot_mapping[:t].tolist())
            graphs.hidden[:t] = torch.stack([graphs.input_ids[:t], graphs.positions[:t]], dim=1).float()

    graphs.graphs = {key: FakeGraph(key) for key in graphs.keys}
    q_lens, starts = [4, 1, 3], [5, 9, 0]
    ids = torch.arange(100, 108)
    positions = torch.cat([torch.arange(s, s + q) for s, q in zip(starts, q_lens, strict=True)])
    meta = AttentionMetadata(
        slot_mapping=positions + 40, query_start_loc=torch.tensor([0, 4, 5, 8], dtype=torch.int32),
        seq_lens=torch.tensor([9, 10, 3], dtype=torch.int32), block_tables=torch.ones(3, 3, dtype=torch.int32),
        max_query_len=4, max_seq_len=10, block_size=4,
    )
    batch = SimpleNamespace(input_ids=ids, positions=positions, meta=meta)
    assert graphs.bucket(3, 8, 4, 3) is not None  # 3 sequences, 8 tokens, at most 4 each, 3 block columns
    hidden = graphs.run(batch)
    assert hidden[:, 0].tolist() == ids.float().tolist() and hidden[:, 1].tolist() == positions.float().tolist()
    assert seen["bs"] == 4 and seen["cap"] == 8 and seen["qsl"] == [0, 4, 5, 8, 8]
    assert seen["seq_lens"] == [9, 10, 3, 0] and seen["slots"] == (positions + 40).tolist()
    one_less = SimpleNamespace(input_ids=ids[:7], positions=positions[:7], meta=dataclasses.replace(
        meta, slot_mapping=meta.slot_mapping[:7], query_start_loc=torch.tensor([0, 4, 5, 7], dtype=torch.int32)))
    graphs.run(one_less)  # 7 tokens: the 8-token graph, one padding token to the null block
    assert seen["cap"] == 8 and seen["slots"][7:] == [0] and seen["qsl"] == [0, 4, 5, 7, 7]
    too_long = SimpleNamespace(input_ids=ids, positions=positions, meta=AttentionMetadata(
        slot_mapping=meta.slot_mapping, query_start_loc=torch.tensor([0, 5, 8], dtype=torch.int32),
        seq_lens=torch.tensor([10, 3], dtype=torch.int32), block_tables=meta.block_tables[:2],
        max_query_len=5, max_seq_len=10, block_size=4))
    assert graphs.bucket(2, 8, too_long.meta.max_query_len, 3) is None


def test_token_capacities_grow_from_a_quarter_more_than_the_batch_to_the_full_bucket():
    from infergrid.worker.runner.cuda_graph import pack_key, token_capacities, unpack_key

    assert token_capacities(1, 5) == [2, 3, 4, 5]
    assert token_capacities(4, 4) == [5, 6, 8, 12, 16]
    assert token_capacities(32, 5) == [40, 48, 64, 96, 128, 160]
    assert unpack_key(pack_key(32, 160)) == (32, 160)


def test_config_and_draft_compatibility_errors(tiny_model, tmp_path):
    from infergrid.worker import LLM
    from infergrid.worker.config import EngineConfig
    from infergrid.worker.tiny_model import make_tiny_model

    with pytest.raises(ValueError, match="draft_lm_head_dtype must be None or 'fp8', got 'int4'"):
        EngineConfig(model="m", speculative_method="draft", num_speculative_tokens=2, draft_model="d",
                     draft_lm_head_dtype="int4")
    with pytest.raises(ValueError, match="draft_lm_head_dtype is only used when speculative_method is 'draft'"):
        EngineConfig(model="m", speculative_method="ngram", num_speculative_tokens=2, draft_lm_head_dtype="fp8")
    with pytest.raises(ValueError, match="draft_model vocabulary"):  # a different tokenizer
        LLM(tiny_model("llama"), dtype="float32", max_model_len=64, speculative_method="draft",
            num_speculative_tokens=2, draft_model=make_tiny_model(str(tmp_path / "v512"), vocab_size=512))


@pytest.mark.parametrize(("vocab", "lookback"), [(3, 4096), (5, 12), (40, 4096), (2, 7)])
def test_ngram_index_search_equals_the_vectorized_window_search(vocab, lookback):
    """The incremental index (newest candidate first, early stop) proposes exactly what one numpy
    pass over the window proposes, step after step, also when the window cuts the history, when a
    token recurs too often (the vectorized fallback) and when nothing matches."""

    import numpy as np

    from infergrid.worker.spec_decode.ngram_proposer import NgramProposer

    rng = random.Random(vocab * 1000 + lookback)
    proposer = NgramProposer(max_lookback=lookback)
    for req in range(6):
        tokens: list[int] = []
        for _ in range(300):
            tokens.append(rng.randrange(vocab) if rng.random() < 0.7 or len(tokens) < 8 else tokens[-rng.randrange(1, 8)])
            k = rng.randrange(1, 6)
            got = proposer.propose(tokens, k, f"r{req}")
            window = np.asarray(tokens[-lookback:], dtype=np.int64)
            start = proposer._lookup_vectorized(window) if len(tokens) >= proposer.min_n + 1 else None
            expected = [] if start is None else [int(window[start + i % (len(window) - start)]) for i in range(k)]
            if expected:  # (with no match, the request may follow its last one)
                assert got == expected, (tokens[-12:], k)
            assert proposer.propose(tokens, k) == expected  # stateless call: the lookup alone
        proposer.remove(f"r{req}")


def test_ngram_falls_back_to_the_vectorized_search_for_a_token_that_recurs_everywhere(monkeypatch):
    from infergrid.worker.spec_decode import ngram_proposer
    from infergrid.worker.spec_decode.ngram_proposer import MAX_SCALAR_CANDIDATES, NgramProposer

    calls = []
    original = NgramProposer._lookup_vectorized
    monkeypatch.setattr(NgramProposer, "_lookup_vectorized",
                        lambda self, tokens: calls.append(len(tokens)) or original(self, tokens))
    x = 1
    tokens = [t for i in range(MAX_SCALAR_CANDIDATES + 10) for t in (x, 1000 + i)]  # x, then a new token
    tokens += [7, 8, 7, x]  # "7 x" never occurred, nor "8 7 x": only 1-token matches of x
    assert NgramProposer().propose(tokens, 3, "r") == [] and calls == [len(tokens)]
    tokens += [8, 7, x]  # now "x 8 7 x"... "8 7 x" recurs (3 tokens back): found by the fallback too
    assert NgramProposer().propose(tokens, 2, "r") == [8, 7] and len(calls) == 2
    assert ngram_proposer.DEFAULT_MIN_N == 2


def test_fp8_lm_head_rounds_the_weights_and_keeps_the_argmax_mostly():
    """The draft's FP8 head (layers/fp8_lm_head.py; on a CPU: its weights dequantized): logits within
    FP8's rounding of the bf16 head's, the same top token for nearly every row."""
    import torch

    from infergrid.worker.layers.fp8_lm_head import Fp8LMHead

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4096, 256, generator=g) * 0.05
    hidden = torch.randn(64, 256, generator=g)
    head = Fp8LMHead(weight)
    assert not head.use_fp8_gemm and head.weight.dtype == weight.dtype
    exact, quantized = hidden @ weight.t(), head(hidden)
    assert not torch.equal(exact, quantized)  # rounded...
    assert (quantized - exact).abs().max() < 0.05 * exact.abs().max()  # ... to within a few percent
    assert (quantized.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9




@pytest.mark.parametrize("cls", ["NgramProposer", "DraftProposer"])
def test_both_drafters_implement_the_proposer_interface(cls):
    """SpeculativeDecoder talks to either drafter through `Proposer` alone (spec_decode/proposer.py):
    each implements every member with the interface's parameters."""
    import inspect

    from infergrid.worker.spec_decode import draft_proposer, ngram_proposer
    from infergrid.worker.spec_decode.proposer import Proposer

    drafter = getattr(ngram_proposer if cls == "NgramProposer" else draft_proposer, cls)
    members = [name for name in vars(Proposer) if not name.startswith("_")]
    assert set(members) >= {"device_drafts", "propose_drafts", "launch_ahead", "note_step", "remove_requests"}
    for name in members:
        expected = vars(Proposer)[name]
        if isinstance(expected, property):  # an attribute or a property of the drafter
            assert name in vars(drafter) or name in inspect.signature(drafter.__init__).parameters or \
                name in inspect.getsource(drafter.__init__), f"{cls} lacks {name}"
            continue
        method = getattr(drafter, name, None)
        assert callable(method), f"{cls} lacks {name}()"
        assert list(inspect.signature(method).parameters)[1:] == list(inspect.signature(expected).parameters)[1:], name
