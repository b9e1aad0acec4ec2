"""The rejection sampler on its own: lossless for random target/draft distributions (G-test over
40,000 verifications per case), acceptance rate = sum(min(p, q)), exact greedy, the target's
sampling parameters applied to p as the normal sampler applies them, and the same test catching
deliberately broken verifiers."""

from __future__ import annotations

import pytest
import torch
from spec_stats import g_test_pvalue

from infergrid.worker.sample.rejection_sampler import NO_DRAFT, RejectionSampler, rejection_sample
from infergrid.worker.sample.sampler import Sampler, SamplingMetadata

N = 40_000
V = 12


def _dirichlet(gen: torch.Generator, alpha: float = 1.0, zeros: int = 0) -> torch.Tensor:
    x = torch.empty(V, dtype=torch.float64).exponential_(generator=gen) ** (1.0 / alpha)
    if zeros:
        x[torch.randperm(V, generator=gen)[:zeros]] = 0.0  # a top-k'd distribution
    return (x / x.sum()).float()


CASES = {  # name -> (target zeros, draft zeros, dirichlet alpha)
    "dense": (0, 0, 1.0),
    "peaked": (0, 0, 0.3),
    "draft_misses_tokens": (0, 5, 1.0),
    "target_top_k": (6, 0, 1.0),
}


def _case(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    p_zeros, q_zeros, alpha = CASES[name]
    gen = torch.Generator().manual_seed(list(CASES).index(name) + 100)
    return _dirichlet(gen, alpha, p_zeros), _dirichlet(gen, alpha, q_zeros)


def _verify(p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)
    rows = torch.arange(N)
    return rejection_sample(
        p.expand(N, V), drafts, torch.zeros(N, dtype=torch.bool),
        draft_prob_rows=None if q is None else rows, draft_probs=None if q is None else q.expand(N, V),
    )


def _drafts_from(q: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.multinomial(q, N, replacement=True, generator=torch.Generator().manual_seed(seed))


def _counts(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=V)


@pytest.mark.parametrize("name", list(CASES))
def test_emitted_token_has_the_target_distribution(name):
    p, q = _case(name)
    drafts = _drafts_from(q, seed=1)
    tokens, accepted = _verify(p, q, drafts)
    assert g_test_pvalue(_counts(tokens), p) > 0.01
    # Acceptance happens with probability sum(min(p, q)) (within 4 standard deviations).
    rate = float(torch.minimum(p, q).sum())
    sd = (rate * (1 - rate) / N) ** 0.5
    assert abs(accepted.float().mean().item() - rate) < 4 * sd + 1e-6
    assert bool((tokens[accepted] == drafts[accepted]).all())
    assert bool((tokens[~accepted] != drafts[~accepted]).all())  # the residual never holds the draft


@pytest.mark.parametrize("name", list(CASES))
def test_deliberately_broken_verifiers_are_caught(name):
    """Same data and test: always-accept emits q; "resample from p on rejection" (instead of the
    residual) over-weights the tokens q likes. Both give p-values far below 0.01."""
    p, q = _case(name)
    drafts = _drafts_from(q, seed=1)
    assert g_test_pvalue(_counts(drafts), p) < 0.01  # always accept
    torch.manual_seed(0)
    u = torch.rand(N)
    keep = u * q[drafts] < p[drafts]
    resampled = torch.multinomial(p, N, replacement=True, generator=torch.Generator().manual_seed(2))
    assert g_test_pvalue(_counts(torch.where(keep, drafts, resampled)), p) < 0.01


@pytest.mark.parametrize("name", ["dense", "target_top_k"])
def test_deterministic_drafts_keep_the_target_distribution(name):
    """n-gram drafts have q = one-hot: accept with probability p(d), else sample p without d."""
    p, _ = _case(name)
    drafts = torch.arange(N) % V  # fixed proposals, every token in turn
    tokens, accepted = _verify(p, None, drafts)
    assert g_test_pvalue(_counts(tokens), p) > 0.01
    for d in range(V):
        rows = drafts == d
        assert abs(accepted[rows].float().mean().item() - float(p[d])) < 4 * (0.25 / rows.sum().item()) ** 0.5
    assert g_test_pvalue(_counts(drafts), p) < 0.01  # always-accept would emit the drafts


def test_greedy_rows_accept_exactly_the_argmax_and_bonus_rows_sample():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.0, 1.0, 0.0], [0.9, 0.1, 0.0]])
    drafts = torch.tensor([1, 0, NO_DRAFT, NO_DRAFT])
    greedy = torch.tensor([True, True, True, False])
    tokens, accepted = rejection_sample(p, drafts, greedy, draft_prob_rows=torch.tensor([0, 1]), draft_probs=q)
    assert tokens[:3].tolist() == [1, 1, 2] and accepted.tolist() == [True, False, False, False]


def test_seeded_rows_are_reproducible():
    p, q = _case("dense")
    p, q = p.expand(64, V), q.expand(64, V)
    drafts = torch.arange(64) % V

    def run():
        gens = {i: torch.Generator().manual_seed(7) for i in range(0, 64, 2)}
        return rejection_sample(p, drafts, torch.zeros(64, dtype=torch.bool), gens, torch.arange(64), q)[0]

    a, b = run(), run()
    assert torch.equal(a[::2], b[::2])


def _reference_probs(logits: torch.Tensor, output_ids: list[int], prompt_ids: list[int]) -> torch.Tensor:
    """Repetition 1.2 + frequency 0.3 penalties, temperature 0.7, top_k 6, top_p 0.9 — written out."""
    x = logits.clone().double()
    for t in set(prompt_ids) | set(output_ids):
        x[t] = x[t] / 1.2 if x[t] > 0 else x[t] * 1.2
    for t in output_ids:
        x[t] -= 0.3
    x = x / 0.7
    order = x.argsort(descending=True)
    keep = torch.zeros(V, dtype=torch.bool)
    keep[order[:6]] = True
    probs = torch.where(keep, x, torch.tensor(float("-inf"), dtype=torch.float64)).softmax(-1)
    sorted_probs = probs[order]
    # top_p keeps the smallest prefix (by descending probability) whose mass reaches 0.9
    cum = sorted_probs.cumsum(0)
    n_keep = int((cum < 0.9).sum()) + 1
    final = torch.zeros(V, dtype=torch.float64)
    final[order[:n_keep]] = probs[order[:n_keep]]
    return (final / final.sum()).float()


def test_sampling_params_apply_to_p_as_in_the_normal_sampler():
    """Penalties, temperature, top_k and top_p shape p exactly as plain sampling does: the verified
    tokens and the normal sampler's tokens both fit the written-out reference distribution."""
    n = 20_000
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(V, generator=gen) * 0.5
    output_ids, prompt_ids = [3, 3, 7], [1, 2, 3]
    ref = _reference_probs(logits, output_ids, prompt_ids)
    meta = SamplingMetadata(
        temperature=torch.full((n,), 0.7), all_greedy=False,
        top_p=torch.full((n,), 0.9), top_k=torch.full((n,), 6, dtype=torch.int64),
        repetition_penalty=torch.full((n,), 1.2), frequency_penalty=torch.full((n,), 0.3),
        prompt_token_ids=[prompt_ids] * n, output_token_ids=[output_ids] * n,
    )
    q = _dirichlet(gen)
    drafts = torch.multinomial(q, n, replacement=True, generator=gen)
    torch.manual_seed(3)
    batch_logits = logits.expand(n, V).contiguous()
    verified = RejectionSampler()(batch_logits, meta, drafts, torch.arange(n), q.expand(n, V)).sampled
    plain = Sampler()(batch_logits, meta).sampled
    assert torch.allclose(Sampler().compute_probs(logits[None], _one_row(meta)), ref[None], atol=1e-5)
    assert g_test_pvalue(torch.bincount(verified, minlength=V), ref) > 0.01
    assert g_test_pvalue(torch.bincount(plain, minlength=V), ref) > 0.01
    assert g_test_pvalue(torch.bincount(drafts, minlength=V), ref) < 0.01


def _one_row(meta: SamplingMetadata) -> SamplingMetadata:
    return SamplingMetadata(
        temperature=meta.temperature[:1], all_greedy=False, top_p=meta.top_p[:1], top_k=meta.top_k[:1],
        repetition_penalty=meta.repetition_penalty[:1], frequency_penalty=meta.frequency_penalty[:1],
        prompt_token_ids=meta.prompt_token_ids[:1], output_token_ids=meta.output_token_ids[:1],
    )
