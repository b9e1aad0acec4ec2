"""Sampler unit tests on hand-made logits: masks, penalties, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from infergrid.worker.sample.argmax import argmax_rows
from infergrid.worker.sample.sampler import (
    Sampler,
    SamplingMetadata,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
)

NEG_INF = float("-inf")


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [sorted(torch.nonzero(row != NEG_INF).flatten().tolist()) for row in logits]


def test_top_k_keeps_the_k_largest_per_row():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.5, 0.1, 0.3, 0.2, 0.4]])
    out = apply_top_k_top_p(logits, torch.tensor([2, 5]), None)
    assert kept(out) == [[1, 3], [0, 1, 2, 3, 4]]
    assert out[0, 1] == 5.0 and out[0, 3] == 4.0  # survivors keep their values


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.9, 0.05, 0.03, 0.02]])
    logits = probs.log()
    out = apply_top_k_top_p(logits, None, torch.tensor([0.75, 0.6, 0.5]))
    # row 0: 0.5 + 0.3 reaches 0.75; row 1: 0.5 alone < 0.6 so 0.3 joins; row 2: the top token alone
    assert kept(out) == [[0, 1], [2, 3], [0]]


def test_top_k_and_top_p_together():
    logits = torch.tensor([[0.25, 0.25, 0.25, 0.25]]).log() + torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    out = apply_top_k_top_p(logits, torch.tensor([3]), torch.tensor([0.7]))
    # top_k=3 drops token 3; renormalised over {0,1,2}: p0 = e^3/(e^3+e^2+e) = 0.665 < 0.7 -> {0, 1}
    assert kept(out) == [[0, 1]]


def test_min_p_is_relative_to_the_top_probability():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08]])
    out = apply_min_p(probs.log(), torch.tensor([0.2]))  # threshold 0.1
    assert kept(out) == [[0, 1, 2]]


def test_penalties_match_a_hand_computed_reference():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    meta = SamplingMetadata(
        temperature=torch.zeros(2),
        all_greedy=True,
        presence_penalty=torch.tensor([0.5, 0.0]),
        frequency_penalty=torch.tensor([0.25, 0.0]),
        repetition_penalty=torch.tensor([2.0, 1.5]),
        prompt_token_ids=[[0, 4], [2]],
        output_token_ids=[[1, 1, 3], []],
    )
    out = apply_penalties(logits.clone(), meta)
    # row 0: repetition on {0, 4} (prompt) and {1, 3} (output): positive / 2, negative * 2;
    # then frequency 0.25 * count and presence 0.5 on output tokens 1 (x2) and 3 (x1).
    expected0 = [2.0 / 2, -1.0 * 2 - 0.25 * 2 - 0.5, 0.5, 3.0 / 2 - 0.25 - 0.5, -2.0 * 2]
    expected1 = [1.0, 1.0, 1.0 / 1.5, 1.0, 1.0]  # only the prompt token 2
    torch.testing.assert_close(out, torch.tensor([expected0, expected1]))


def test_greedy_takes_the_argmax_after_penalties():
    logits = torch.tensor([[1.0, 3.0, 2.9]])
    meta = SamplingMetadata(temperature=torch.zeros(1), all_greedy=True,
                            frequency_penalty=torch.tensor([0.5]), output_token_ids=[[1]])
    assert Sampler()(logits, meta).sampled.tolist() == [2]


def test_banned_tokens_are_never_sampled():
    logits = torch.tensor([[10.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    meta = SamplingMetadata(temperature=torch.tensor([0.0, 1.0]), all_greedy=False, banned_token_ids={0: [0], 1: [0]})
    for _ in range(20):
        assert 0 not in Sampler()(logits, meta).sampled.tolist()


def test_random_sampling_follows_the_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(4000, 1)
    meta = SamplingMetadata(temperature=torch.ones(4000), all_greedy=False)
    counts = torch.bincount(Sampler()(logits, meta).sampled, minlength=3).float() / 4000
    torch.testing.assert_close(counts, probs, atol=0.03, rtol=0)


def test_temperature_sharpens():
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, 0.0]]).repeat(2000, 1)
    cold = SamplingMetadata(temperature=torch.full((2000,), 0.25), all_greedy=False)
    share = (Sampler()(logits, cold).sampled == 0).float().mean().item()
    assert share == pytest.approx(1 / (1 + math.exp(-4)), abs=0.03)  # softmax([4, 0])[0] = 0.982


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(1, 50)

    def draw(batch_logits: torch.Tensor, row: int) -> list[int]:
        gen = torch.Generator().manual_seed(1234)
        meta = SamplingMetadata(temperature=torch.ones(batch_logits.shape[0]), all_greedy=False,
                                generators={row: gen})
        return [Sampler()(batch_logits, meta).sampled[row].item() for _ in range(10)]

    alone = draw(logits, 0)
    batched = draw(torch.cat([torch.randn(3, 50), logits, torch.randn(2, 50)]), 3)
    assert alone == batched
    assert len(set(alone)) > 1  # it really samples


def test_logprobs_are_raw_with_ranks():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    meta = SamplingMetadata(temperature=torch.tensor([0.5]), all_greedy=False,
                            banned_token_ids={0: [0]}, max_num_logprobs=2)
    out = Sampler()(logits, meta)
    raw = logits.log_softmax(-1)[0]
    assert out.sampled.item() != 0
    sampled = out.sampled.item()
    assert out.logprob_token_ids[0].tolist() == [sampled, 0, 1]
    torch.testing.assert_close(out.logprobs[0], raw[[sampled, 0, 1]])
    assert out.sampled_ranks.item() == sampled + 1  # logits are sorted descending by id


@pytest.mark.parametrize("vocab", [128256, 384, 1000, 4096])
@pytest.mark.parametrize("rows", [1, 3, 70])
def test_two_stage_argmax_equals_argmax_ties_included(vocab, rows):
    g = torch.Generator().manual_seed(vocab + rows)
    ties = torch.randint(0, 5, (rows, vocab), generator=g).float()  # many equal maxima: the first wins
    noise = torch.randn(rows, vocab, generator=g)
    for x in (ties, noise):
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
