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

import bisect
from collections.abc import Sequence

import numpy as np

DEFAULT_MIN_N = 2
DEFAULT_MAX_N = 4
# Only the most recent tokens are searched, so a step's cost stays bounded for long contexts.
DEFAULT_MAX_LOOKBACK = 4096


# Candidates checked one by one (newest first) before the vectorized search takes over.
MAX_SCALAR_CANDIDATES = 64


class _TokenIndex:
    """Where each token occurs with a continuation: token -> its positions e < len - 1, ascending.
    Tokens are only ever appended, so each step indexes just the new ones."""

    __slots__ = ("positions", "size")

    def __init__(self) -> None:
        self.positions: dict[int, list[int]] = {}
        self.size = 0

    def sync(self, token_ids: Sequence[int]) -> None:
        n = len(token_ids)
        if n < self.size:  # not the same request's tokens: start over
            self.positions.clear()
            self.size = 0
        positions = self.positions
        for e in range(max(self.size - 1, 0), n - 1):
            positions.setdefault(token_ids[e], []).append(e)
        self.size = n


class NgramProposer:
    """Proposes up to k tokens per request by matching the longest recent n-gram suffix.

    Keeps an index of each request's token positions (appending only the new ones each step); call
    `remove` when a request finishes. Search per step: the last token's earlier positions, newest
    first, each extended backwards up to max_n tokens; it stops at the first max_n match, so the
    usual cost is a few list lookups. Past MAX_SCALAR_CANDIDATES candidates (a token that recurs
    everywhere without a long match) one vectorized pass over the window decides instead.
    """

    def __init__(self, min_n: int = DEFAULT_MIN_N, max_n: int = DEFAULT_MAX_N,
                 max_lookback: int = DEFAULT_MAX_LOOKBACK) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n, self.max_lookback = min_n, max_n, max_lookback
        self._indexes: dict[str, _TokenIndex] = {}

    def propose(self, token_ids: Sequence[int], k: int, request_id: str | None = None,
                end: int | None = None) -> list[int]:
        """Up to k draft tokens continuing `token_ids[:end]` (empty when no n-gram suffix recurs).
        `end` below len(token_ids) asks what would have been proposed then (hindsight checks)."""
        num = len(token_ids) if end is None else end
        if k <= 0 or num < self.min_n + 1:
            return []
        index = _TokenIndex() if request_id is None else self._indexes.setdefault(request_id, _TokenIndex())
        index.sync(token_ids)
        candidates = index.positions.get(token_ids[num - 1])
        if not candidates:
            return []
        stop = len(candidates) if end is None else bisect.bisect_left(candidates, num - 1)
        lo = max(0, num - self.max_lookback)  # the window searched: token_ids[lo:num]
        best_len, best_end = 0, -1
        for checked, e in enumerate(candidates[i] for i in range(stop - 1, -1, -1)):
            if e < lo:
                break
            if checked == MAX_SCALAR_CANDIDATES:
                return self._propose_vectorized(np.asarray(token_ids[lo:num], dtype=np.int64), k)
            n = 1  # tokens matched, ending at e and at num - 1
            while n < self.max_n and e - n >= lo and token_ids[e - n] == token_ids[num - 1 - n]:
                n += 1
            if n > best_len:  # ties keep the newest
                best_len, best_end = n, e
                if n == self.max_n:
                    break
        if best_len < self.min_n:
            return []
        start = best_end + 1
        period = num - start  # past the end the copy repeats (a loop proposes a full k)
        return [token_ids[start + i % period] for i in range(k)]

    def hindsight(self, token_ids: Sequence[int], num_positions: int, request_id: str | None = None) -> int:
        """At how many of the last `num_positions` positions the lookup would have proposed the token
        that came next (a hindsight check of adaptive k; for a sampled request, the chance of that
        equals the chance that the verifier accepts the draft)."""
        num = len(token_ids)
        return sum(
            1 for t in range(max(1, num - num_positions), num)
            if self.propose(token_ids, 1, request_id, end=t) == [token_ids[t]]
        )

    def _propose_vectorized(self, tokens: np.ndarray, k: int) -> list[int]:
        """The same search over a window as one numpy pass per n."""
        num = len(tokens)
        ends = np.flatnonzero(tokens[: num - 1] == tokens[num - 1])
        for n in range(min(self.max_n, num - 1), self.min_n - 1, -1):
            cand = ends[ends >= n - 1]
            match = np.ones(cand.size, dtype=bool)
            for i in range(1, n):  # compare the n - 1 tokens before each candidate end
                match &= tokens[cand - i] == tokens[num - 1 - i]
            hits = cand[match]
            if hits.size:
                start = int(hits[-1]) + 1
                return tokens[start + np.arange(k) % (num - start)].tolist()
        return []

    def remove(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)
