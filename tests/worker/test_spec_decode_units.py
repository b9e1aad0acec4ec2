"""Speculative-decoding parts on their own: n-gram lookup, the adaptive number of drafts and its cost
model, and the draft model's per-block KV validity bookkeeping."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from infergrid.worker.spec_decode.adaptive import (
    CHECK,
    MAX_BACKOFF,
    MIN_BACKOFF,
    NEW_OFF_WAIT,
    AdaptiveNumDrafts,
    best_num_drafts,
    expected_tokens,
)
from infergrid.worker.spec_decode.cost_model import StepCostModel
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


def test_adaptive_starts_on_switches_off_and_comes_back_through_hindsight_checks():
    a = AdaptiveNumDrafts(max_k=4)
    assert a.num_drafts("r", 0.1, 5) == 0 and a.is_on("r")  # new, at the prior: on from the next step
    assert a.any_on and not a.can_skip(6, {"r"})
    assert a.num_drafts("r", 0.1, 6) == 4
    for _ in range(6):
        a.observe("r", 4, 0)
    assert a.acceptance_rate("r") < 0.1
    assert a.num_drafts("r", 0.1, 7) == 0 and not a.is_on("r") and not a.any_on  # off at once
    assert a.can_skip(7, {"r"}) and not a.can_skip(8, {"r"})
    assert a.num_drafts("r", 0.1, 8) == CHECK  # its check falls on the grid
    a.observe_check("r", 0, 8, 0.1, 8)  # the proposer would have missed every emitted token
    assert not a.is_on("r") and a.can_skip(9, {"r"})
    checks = [step for step in range(9, 300) if a.num_drafts("r", 0.1, step) == CHECK
              and a.observe_check("r", 0, 8, 0.1, step) is None]
    assert checks == [16, 32, 64, 128, 256]  # the wait doubles
    assert a.num_drafts("r", 0.1, 512) == CHECK
    a.observe_check("r", 8, 8, 0.1, 512, now=False)  # the text became predictable
    assert a.is_on("r") and a.num_drafts("r", 0.1, 513) == 0  # after a pipelined step: two steps on
    assert a.num_drafts("r", 0.1, 514) >= 1
    a.remove("r")
    assert not a.any_on and a.acceptance_rate("r") == pytest.approx(0.7)
    assert AdaptiveNumDrafts(max_k=3, enabled=False).num_drafts("x", 5.0, 0) == 3


def _simulate(a: AdaptiveNumDrafts, draft_cost: float, acceptance: int, num_steps: int) -> list[int]:
    """k per step (CHECK for a hindsight check) for one request arriving at step 0 whose drafts are
    all accepted (1) or all rejected (0)."""
    ks = []
    for step in range(num_steps):
        k = a.num_drafts("r", draft_cost, step)
        ks.append(k)
        if k == CHECK:
            a.observe_check("r", 8 * acceptance, 8, draft_cost, step)
        elif k:
            a.observe("r", k, k * acceptance)
    return ks


@pytest.mark.parametrize(("draft_cost", "max_steps_on"), [(0.3, 2), (0.05, 6)])
def test_adaptive_switches_off_fast_and_checks_rarely_at_acceptance_zero(draft_cost, max_steps_on):
    """A draft model (c ~ 0.3) is off after 2 failed verifications, cheap n-gram drafts (c ~ 0.05)
    after 6; then only hindsight checks (no drafts) with doubling gaps, at most every MAX_BACKOFF."""
    ks = _simulate(AdaptiveNumDrafts(max_k=4), draft_cost, acceptance=0, num_steps=3000)
    on = [i for i, k in enumerate(ks) if k > 0]
    assert ks[0] == 0 and on[0] == 1 and len(on) <= max_steps_on and on == list(range(1, 1 + len(on)))
    checks = [i for i, k in enumerate(ks) if k == CHECK]
    gaps = [b - a for a, b in zip(checks, checks[1:], strict=False)]
    assert gaps[:6] == [8, 16, 32, 64, 128, 256] and set(gaps[6:]) == {MAX_BACKOFF}
    assert all(c % MIN_BACKOFF == 0 for c in checks)  # on the shared grid
    assert len(checks) <= 16  # over 3,000 steps


@pytest.mark.parametrize("draft_cost", [0.05, 0.3, 0.8])
def test_adaptive_stays_on_at_acceptance_one(draft_cost):
    """Even where a draft token costs most of a step (large batch), perfect drafts pay: on from the
    first step (from the first check where the prior does not pay), and max_k within a few steps."""
    ks = _simulate(AdaptiveNumDrafts(max_k=4), draft_cost, acceptance=1, num_steps=500)
    first = next(i for i, k in enumerate(ks) if k > 0)
    assert first == (1 if draft_cost < 0.5 else NEW_OFF_WAIT + 1)  # (its first check switches it on)
    assert min(ks[first:]) >= 1 and ks[first + 6:] == [4] * (494 - first)
    # Where a draft token costs a whole step, not even perfect drafts pay: nothing is proposed or checked.
    assert _simulate(AdaptiveNumDrafts(max_k=4), 1.0, acceptance=1, num_steps=500) == [0] * 500


def test_new_requests_start_from_the_engine_wide_rate_seeded_ones_from_the_default():
    a = AdaptiveNumDrafts(max_k=4)
    for i in range(20):
        a.num_drafts(f"bad{i}", 0.1, 0)
        a.num_drafts(f"bad{i}", 0.1, 1)
        a.observe(f"bad{i}", 4, 0)
    assert a.engine_rate() < 0.1
    assert a.num_drafts("new", 0.1, 2) == 0 and not a.is_on("new")  # starts off, checked later
    # ... twice as late as NEW_OFF_WAIT: nearly nothing has been accepted lately
    assert [a.num_drafts("new", 0.1, step) for step in range(3, 2 * NEW_OFF_WAIT + 1)][-2:] == [0, CHECK]
    # A draft model's (failing_off_wait = MAX_BACKOFF): at the next multiple of MAX_BACKOFF
    d = AdaptiveNumDrafts(max_k=4, failing_off_wait=MAX_BACKOFF)
    d._engine_accepted, d._engine_trials = 0.05, 1.0
    assert d.num_drafts("new", 0.1, 2) == 0
    assert [d.num_drafts("new", 0.1, step) for step in range(3, MAX_BACKOFF + 1)][-2:] == [0, CHECK]
    assert a.num_drafts("seeded", 0.1, None) == 0 and a.is_on("seeded")  # its own history only
    assert [a.num_drafts("seeded", 0.1, None) for _ in range(2)] == [0, 4]  # two own steps later


def test_step_cost_model_fits_online_and_falls_back_to_the_default():
    a, b = 1e-3, 1e-3 / 64  # a step over N tokens takes 1 ms + N/64 ms
    model = StepCostModel(proposer_cost=0.1)
    assert model.draft_token_cost(32) == pytest.approx(0.5 + 0.1)  # the default before any step
    for i in range(200):
        n = (8, 16, 40, 64, 128)[i % 5]
        model.observe_step(n, a + b * n)
    fit_a, fit_b = model.coefficients()
    assert fit_a == pytest.approx(a, rel=0.02) and fit_b == pytest.approx(b, rel=0.02)
    assert model.draft_token_cost(1) == pytest.approx(b / (a + b) + 0.1, rel=0.02)
    assert model.draft_token_cost(256) == pytest.approx(4 / 5 + 0.1, rel=0.02)
    model.observe_step(64, 1.0)  # a one-second stall counts as 3x the prediction at most
    assert model.coefficients()[0] < 2 * a
    model.observe_proposer(seconds_per_pass=0.5e-3, step_seconds=2e-3)
    assert model.proposer_cost == pytest.approx(0.9 * 0.1 + 0.1 * 0.25)
    assert model.draft_token_cost(32, measured=False) == pytest.approx(0.5 + 0.1)  # seeded requests
    # Equal-size steps say nothing about the slope: the default ratio b = a / 32 remains.
    flat = StepCostModel(proposer_cost=0.0)
    for _ in range(300):
        flat.observe_step(32, 2e-3)
    fa, fb = flat.coefficients()
    assert fa + 32 * fb == pytest.approx(2e-3) and fa / fb == pytest.approx(32)


def test_batch_aware_decision_flips_at_large_batch():
    """Same request, same acceptance (0.6), same measured cost law: worth 4 drafts at batch 1,
    fewer at batch 32, none at batch 256 (verifying 1 + k tokens per request is no longer free)."""
    model = StepCostModel(proposer_cost=0.05)
    for i in range(100):
        n = (1, 5, 32, 160, 256)[i % 5]
        model.observe_step(n, 1e-3 + n * 1e-3 / 64)
    a = AdaptiveNumDrafts(max_k=4, prior_rate=0.6, prior_weight=1000.0)  # the rate stays 0.6

    def decide(req_id: str, batch_size: int) -> int:
        a.num_drafts(req_id, model.draft_token_cost(batch_size), 0)  # new: on or off from the prior
        return a.num_drafts(req_id, model.draft_token_cost(batch_size), 1)

    assert decide("r1", 1) == 4
    assert 1 <= decide("r32", 32) < 4
    assert decide("r256", 256) == 0 and not a.is_on("r256")
    # Off at a large batch, it comes back at its next check once the batch is small.
    ks = [a.num_drafts("r256", model.draft_token_cost(1), step) for step in range(2, NEW_OFF_WAIT + 1)]
    assert ks == [0] * (NEW_OFF_WAIT - 2) + [CHECK]  # (new and off: its first check comes later)
    a.observe_check("r256", 5, 8, model.draft_token_cost(1), NEW_OFF_WAIT)
    assert a.num_drafts("r256", model.draft_token_cost(1), NEW_OFF_WAIT + 1) == 4


def _model_pipelining_at_0_7(proposer_cost: float, pipelined_steps: int) -> StepCostModel:
    """A cost model fitted to steps of 1 ms + N/64 ms, whose pipelined batch-32 steps take 0.7 of that."""
    cost = StepCostModel(proposer_cost)
    for i in range(100):
        n = (1, 5, 32, 160)[i % 4]
        cost.observe_step(n, 1e-3 + n * 1e-3 / 64)
    for _ in range(pipelined_steps):
        cost.observe_pipelined_step(32, 0.7 * (1e-3 + 32e-3 / 64))
    return cost


def test_a_speculating_step_must_pay_for_the_whole_batch_losing_its_pipelining():
    """rho = 0.7: a step without drafts runs pipelined in 0.7 of a synchronous step. One perfect
    drafter in a batch of 32 does not pay for the 31 others' loss; 32 good drafters do; at batch
    1 the check is the single request's (best_num_drafts against 1 / rho)."""
    cost = _model_pipelining_at_0_7(0.05, pipelined_steps=80)
    assert cost.plain_goodput(32) == pytest.approx(1 / 0.7, rel=0.05)
    c32 = cost.draft_token_cost(32)
    assert not cost.speculation_pays(32, c32, expected_tokens(1.0, 4) - 1, 4, 4)
    assert cost.speculation_pays(32, c32, 32 * (expected_tokens(0.9, 4) - 1), 32 * 4, 4)
    c1 = cost.draft_token_cost(1)
    for rate in (0.2, 0.4, 0.6, 0.9):
        k = best_num_drafts(rate, 4, c1, cost.plain_goodput(1))
        assert cost.speculation_pays(1, c1, expected_tokens(rate, max(k, 1)) - 1, max(k, 1), max(k, 1)) == (k > 0)


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


def test_ngram_hindsight_asks_what_the_lookup_would_have_proposed_then():
    rng = np.random.default_rng(0)
    for _ in range(200):
        tokens = rng.integers(0, 4, size=int(rng.integers(3, 60))).tolist()
        live = NgramProposer()
        live.propose(tokens, 3, "r")  # its index covers every token
        for end in range(1, len(tokens) + 1):
            assert live.propose(tokens, 3, "r", end=end) == NgramProposer().propose(tokens[:end], 3)
    loop = [5, 1, 2, 3, 1, 2, 3, 1, 2, 3]
    assert NgramProposer().hindsight(loop, 4, "r") == 4  # "3 1" -> 2, "1 2" -> 3, ...
    assert NgramProposer().hindsight(loop, 9) == 4  # "3 1" first recurs at the end of position 7


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
    import random

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


def test_pipelined_steps_raise_the_bar_for_speculation():
    """Where a step without speculation runs pipelined in 0.7 of a synchronous step's time, a
    request must beat 1 / 0.7 tokens per synchronous step: rate 0.3 pays at rho 1, not at 0.7."""
    cost = StepCostModel(0.0)
    assert cost.plain_goodput(1) == 1.0
    for _ in range(40):
        cost.observe_step(1, 0.010)
        cost.observe_step(5, 0.0102)
    cost.observe_pipelined_step(1, 0.007)
    assert cost.pipelined_ratio(1) < 1.0
    for _ in range(60):
        cost.observe_pipelined_step(1, 0.007)
    assert cost.plain_goodput(1) == pytest.approx(1 / 0.7, rel=0.05)
    assert cost.plain_goodput(1, measured=False) == 1.0
    c = cost.draft_token_cost(1)
    assert best_num_drafts(0.3, 4, c) > 0
    assert best_num_drafts(0.3, 4, c, cost.plain_goodput(1)) == 0
    assert best_num_drafts(0.9, 4, c, cost.plain_goodput(1)) > 0
    # Another batch size has its own ratio: pipelined steps of 32 say nothing about batch 1.
    for _ in range(60):
        cost.observe_pipelined_step(32, 0.3 * (cost.coefficients()[0] + 32 * cost.coefficients()[1]))
    assert cost.plain_goodput(32) == pytest.approx(1 / 0.3, rel=0.05)
    assert cost.plain_goodput(1) == pytest.approx(1 / 0.7, rel=0.05)
    # A size not measured borrows the nearest measured one's (the tail of a batch finishing one by one).
    assert cost.plain_goodput(2) == cost.plain_goodput(1) and cost.plain_goodput(16) == cost.plain_goodput(32)


def test_lookups_that_keep_missing_switch_a_request_off_like_failing_drafts():
    a = AdaptiveNumDrafts(max_k=4)
    a.num_drafts("r", 0.1, 7)
    assert a.num_drafts("r", 0.1, 8) == 4
    a.observe("r", 4, 4)
    a.miss("r")  # the n-gram lookup found nothing: one miss (an edit in a quoted passage) keeps it on
    assert a.any_on and a.num_drafts("r", 0.1, 9) > 0
    step = 10
    while a.num_drafts("r", 0.1, step):  # ... but a lookup that keeps missing is a draft that keeps failing
        a.miss("r")
        step += 1
    assert 12 <= step <= 20 and not a.any_on and a.acceptance_rate("r") < 0.2  # from a perfect record
    assert a.can_skip(step + 1, {"r"})


def test_a_proposer_stall_counts_as_three_times_the_estimate_at_most():
    """A draft pass that compiled a kernel (seconds instead of a millisecond) must not price the draft
    model out for good: switched off, it would propose nothing that could correct the estimate."""
    model = StepCostModel(proposer_cost=0.3)
    model.observe_proposer(seconds_per_pass=0.5, step_seconds=2e-3)  # 250 steps' worth
    assert model.proposer_cost == pytest.approx(0.9 * 0.3 + 0.1 * 0.9)
    ngram = StepCostModel(proposer_cost=0.0)  # a free proposer's samples are capped at 0.3
    ngram.observe_proposer(seconds_per_pass=1.0, step_seconds=1e-3)
    assert ngram.proposer_cost == pytest.approx(0.1 * 0.3)


def test_the_gpu_prior_keeps_verification_cheap_until_large_steps_are_measured():
    """Only batch-1 steps seen (1 and 5 tokens, the difference being the draft's work): the slope is the
    prior's. On a GPU (a step's fixed cost worth 256 tokens) verifying 4 drafts for each of 32
    requests is a fraction of a step, so speculation gets tried at batch 32 and measured there; with
    the CPU's 32 it would look like half a step, and a perfect draft would never be tried."""
    gpu, cpu = StepCostModel(0.05, fixed_cost_tokens=256), StepCostModel(0.05)
    for model in (gpu, cpu):
        for _ in range(30):
            model.observe_step(5, 2.2e-3)
        model.observe_step(1, 1.8e-3)
        for _ in range(40):
            model.observe_pipelined_step(32, 1.4e-3)
    assert gpu.draft_token_cost(32) < 0.4 < cpu.draft_token_cost(32)
    assert gpu.speculation_pays(32, gpu.draft_token_cost(32), 32 * 4.0, 32 * 4, 4)
    assert not cpu.speculation_pays(32, cpu.draft_token_cost(32), 32 * 4.0, 32 * 4, 4)


def test_speculating_steps_that_deliver_less_than_predicted_lower_the_next_predictions():
    """The check predicts that 32 drafters at rate 0.9 pay against pipelined steps in 0.7 of a step;
    the steps then emit only half the predicted tokens per second (lookups that miss, say): after a
    few such steps the same prediction no longer pays, while batch 1's (its own kappa) still does; a size
    not measured borrows the nearest measured size's kappa.
    Steps that deliver what was predicted leave kappa at 1."""
    cost = _model_pipelining_at_0_7(0.0, pipelined_steps=40)
    c32, c1 = cost.draft_token_cost(32), cost.draft_token_cost(1)
    extra = 32 * (expected_tokens(0.9, 4) - 1)

    def predicted_rate() -> float:  # tokens per second the paying check promised
        assert cost._prediction is not None
        return cost._prediction[1]

    assert cost.speculation_pays(1, c1, expected_tokens(0.8, 4) - 1, 4, 4)
    cost.observe_speculating_step(1, 4, 4 / predicted_rate())  # batch 1 delivers what was predicted
    assert cost.speculation_pays(32, c32, extra, 32 * 4, 4)
    rate = predicted_rate()
    cost.observe_speculating_step(32, 100, 100 / rate)  # as predicted
    assert cost.calibration(32) == pytest.approx(1.0)
    steps = 0
    while cost.speculation_pays(32, c32, extra, 32 * 4, 4):
        cost.observe_speculating_step(32, 50, 100 / predicted_rate())
        steps += 1
    assert 2 <= steps <= 8 and cost.calibration(32) < 0.9
    assert cost.calibration(1) == pytest.approx(1.0) and cost.speculation_pays(1, c1, expected_tokens(0.8, 4) - 1, 4, 4)
    assert cost.calibration(16) == cost.calibration(32)  # not measured: the nearest size's
    cost.observe_speculating_step(1, 3, None)  # not a comparable step: no sample
    assert cost.calibration(1) == pytest.approx(1.0)


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


def test_step_cost_fit_keeps_its_prior_where_noisy_steps_barely_differ_in_size():
    """A GPU at batch 32: synchronous steps of 32-48 tokens (some requests with drafts) whose times
    jitter by 0.6 ms around 2.5 ms + 0.01 ms/token. The slope of so narrow a band is mostly noise;
    trusted, it once priced a draft token at a whole step (0.009 ms + 0.087 ms/token on an H200), after
    which no request speculated and no synchronous step came to correct it. Weighed by its standard
    error against the prior, it stays near the prior; noise-free or widely spread steps are still fitted."""
    rng = random.Random(0)
    worst = 0.0
    for seed in range(20):
        rng.seed(seed)
        model = StepCostModel(proposer_cost=0.0, fixed_cost_tokens=256)
        for _ in range(200):
            n = rng.randint(32, 48)
            model.observe_step(n, 2.5e-3 + 1e-5 * n + rng.gauss(0.0, 0.6e-3))
            worst = max(worst, model.draft_token_cost(32))
    assert worst < 0.5  # (true: 0.11; the plain least-squares slope reached 1.0 in these runs)
    # Widely spread sizes (decode and verification steps at batch 32) are fitted despite the noise.
    wide = StepCostModel(proposer_cost=0.0, fixed_cost_tokens=256)
    for i in range(400):
        n = (32, 160)[i % 2]
        wide.observe_step(n, 2.5e-3 + 1e-5 * n + rng.gauss(0.0, 0.2e-3))
    a, b = wide.coefficients()
    assert a == pytest.approx(2.5e-3, rel=0.15) and b == pytest.approx(1e-5, rel=0.3)
