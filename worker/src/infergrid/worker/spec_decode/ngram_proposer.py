"""N-gram ("prompt lookup") proposer: guess the continuation from the request's own tokens.

The last n tokens (n from `max_n` down to `min_n`) are looked up earlier in prompt + output; the
tokens that followed their most recent earlier occurrence are the drafts:

    tokens:  ... a b c d e ... x a b c   (suffix "a b c", n = 3)
                 ^^^^^ found earlier, followed by "d e ..."  ->  drafts [d, e, ...]

A match that runs into the end of the context keeps copying with the same period, so a repeating
loop ("x y x y") proposes a full k tokens ("x y x y").

No model runs, so the proposal is deterministic (a one-hot draft distribution): the verifier
accepts draft i with probability p(draft i), which is exactly "sample from p, keep while equal".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

DEFAULT_MIN_N = 2
DEFAULT_MAX_N = 4
# Only the most recent tokens are searched, so a step's cost stays bounded for long contexts.
DEFAULT_MAX_LOOKBACK = 4096


class NgramProposer:
    """Proposes up to k tokens per request by matching the longest recent n-gram suffix."""

    def __init__(self, min_n: int = DEFAULT_MIN_N, max_n: int = DEFAULT_MAX_N,
                 max_lookback: int = DEFAULT_MAX_LOOKBACK) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n, self.max_lookback = min_n, max_n, max_lookback

    def propose(self, token_ids: Sequence[int], k: int) -> list[int]:
        """Up to k draft tokens continuing `token_ids` (empty when no n-gram suffix recurs)."""
        if k <= 0 or len(token_ids) < self.min_n + 1:
            return []
        tokens = np.asarray(token_ids[-self.max_lookback :], dtype=np.int64)
        num = len(tokens)
        for n in range(min(self.max_n, num - 1), self.min_n - 1, -1):
            suffix = tokens[num - n :]
            # Candidate starts 0 .. num - n - 1: every earlier window, with at least one token after it.
            windows = sliding_window_view(tokens[: num - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                return _continue(tokens.tolist(), int(hits[-1]) + n, k)
        return []


def _continue(tokens: list[int], start: int, k: int) -> list[int]:
    """k tokens copied from `start` on; past the end the copy repeats with period len - start
    (a match 2 tokens back in "x y x y" continues "x y x y ..."), so loops yield full drafts."""
    drafts: list[int] = []
    for j in range(k):
        idx = start + j
        drafts.append(tokens[idx] if idx < len(tokens) else drafts[idx - len(tokens)])
    return drafts
