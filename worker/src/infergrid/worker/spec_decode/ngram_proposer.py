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

DEFAULT_MIN_N = 2
DEFAULT_MAX_N = 4
# Only the most recent tokens are searched, so a step's cost stays bounded for long contexts.
DEFAULT_MAX_LOOKBACK = 4096


class _TokenBuffer:
    """A request's tokens as a growing numpy array (tokens are only ever appended)."""

    def __init__(self) -> None:
        self.data = np.empty(256, dtype=np.int64)
        self.size = 0

    def sync(self, token_ids: Sequence[int]) -> np.ndarray:
        n = len(token_ids)
        if n < self.size:  # not the same request's tokens: start over
            self.size = 0
        if n > self.data.size:
            grown = np.empty(max(n, 2 * self.data.size), dtype=np.int64)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        if n > self.size:
            self.data[self.size : n] = token_ids[self.size : n]
            self.size = n
        return self.data[:n]


class NgramProposer:
    """Proposes up to k tokens per request by matching the longest recent n-gram suffix.

    Keeps each request's tokens in a numpy buffer (appending only the new ones each step); call
    `remove` when a request finishes. Search cost per step: one vectorized pass over the lookback
    window for the last token, then a check of the candidates' preceding n - 1 tokens.
    """

    def __init__(self, min_n: int = DEFAULT_MIN_N, max_n: int = DEFAULT_MAX_N,
                 max_lookback: int = DEFAULT_MAX_LOOKBACK) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n, self.max_lookback = min_n, max_n, max_lookback
        self._buffers: dict[str, _TokenBuffer] = {}

    def propose(self, token_ids: Sequence[int], k: int, request_id: str | None = None) -> list[int]:
        """Up to k draft tokens continuing `token_ids` (empty when no n-gram suffix recurs)."""
        if k <= 0 or len(token_ids) < self.min_n + 1:
            return []
        if request_id is None:
            tokens = np.asarray(token_ids[-self.max_lookback :], dtype=np.int64)
        else:
            tokens = self._buffers.setdefault(request_id, _TokenBuffer()).sync(token_ids)[-self.max_lookback :]
        num = len(tokens)
        # Candidate ends e (e < num - 1, so a continuation exists) where the last token recurs.
        ends = np.flatnonzero(tokens[: num - 1] == tokens[num - 1])
        if ends.size == 0:
            return []
        for n in range(min(self.max_n, num - 1), self.min_n - 1, -1):
            cand = ends[ends >= n - 1]
            match = np.ones(cand.size, dtype=bool)
            for i in range(1, n):  # compare the n - 1 tokens before each candidate end
                match &= tokens[cand - i] == tokens[num - 1 - i]
            hits = cand[match]
            if hits.size:
                return _continue(tokens, int(hits[-1]) + 1, k)
        return []

    def remove(self, request_id: str) -> None:
        self._buffers.pop(request_id, None)


def _continue(tokens: np.ndarray, start: int, k: int) -> list[int]:
    """k tokens copied from `start` on; past the end the copy repeats with period len - start
    (a match 2 tokens back in "x y x y" continues "x y x y ..."), so loops yield full drafts."""
    period = len(tokens) - start
    idx = start + np.arange(k) % period
    return tokens[idx].tolist()
