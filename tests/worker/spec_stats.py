"""Goodness-of-fit helpers for the speculative-decoding distribution tests."""

from __future__ import annotations

import torch


def g_test_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """G-test (likelihood-ratio chi-square) p-value of observed `counts` against `probs`.

    Cells whose expected count is below `min_expected` are pooled into one cell (the usual rule for
    the chi-square approximation). An observation in a cell of probability 0 gives p = 0.
    """
    counts = counts.double().flatten()
    probs = probs.double().flatten()
    n = counts.sum()
    if bool((counts[probs <= 0] > 0).any()):
        return 0.0
    expected = probs * n
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    nonzero = obs > 0
    g = 2.0 * (obs[nonzero] * (obs[nonzero] / exp[nonzero]).log()).sum()
    df = obs.numel() - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), g / 2.0))
