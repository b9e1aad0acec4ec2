"""N-gram ("prompt lookup") proposer: guess the continuation from the request's own tokens.

The last n tokens (n from `max_n` down to `min_n`) are looked up earlier in prompt + output; the
tokens that followed their most recent earlier occurrence are the drafts:

    tokens:  ... a b c d e ... x a b c   (suffix "a b c", n = 3)
                 ^^^^^ found earlier, followed by "d e ..."  ->  drafts [d, e, ...]

A match that runs into the end of the context keeps copying with the same period, so a repeating
loop ("x y x y") proposes a full k tokens ("x y x y").

When no suffix recurs, the request *follows* its last match: the output is assumed to stay aligned
with the passage it was copying, so the drafts are the tokens after the aligned position:

    source:  ... p q r s t u v ...       output:  ... p q R s ?   (R: an edit, so "q R" and "R s"
                                                                    recur nowhere)  ->  drafts [t, u, v]

This is what rewriting a passage with a few edits looks like (a document or code edited in place,
the use that prompt lookup serves best): without it, every edit costs the lookups of the next
max_n tokens. A request follows while at least half of its recent tokens equal their aligned source
tokens (FOLLOW_WINDOW); an output that has left the passage stops proposing.

No model runs, so the proposal is deterministic (a one-hot draft distribution): the verifier
accepts draft i with probability p(draft i), which is exactly "sample from p, keep while equal".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from infergrid.worker.engine.scheduler_output import ScheduledRequest, SchedulerOutput

DEFAULT_MIN_N = 2
DEFAULT_MAX_N = 4
# Only the most recent tokens are searched, so a step's cost stays bounded for long contexts.
DEFAULT_MAX_LOOKBACK = 4096


# Following (module docstring): the recent tokens compared with the aligned source, and the least share of
# them that must agree.
FOLLOW_WINDOW = 8
FOLLOW_MIN_AGREEMENT = 0.5

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
        self._offsets: dict[str, int] = {}  # request -> output position minus source position of its last match

    def propose(self, token_ids: Sequence[int], k: int, request_id: str | None = None) -> list[int]:
        """Up to k draft tokens continuing `token_ids` (empty when no n-gram suffix recurs and the
        request follows no passage)."""
        num = len(token_ids)
        if k <= 0 or num < self.min_n + 1:
            return []
        index = _TokenIndex() if request_id is None else self._indexes.setdefault(request_id, _TokenIndex())
        index.sync(token_ids)
        start = self._lookup(token_ids, num, index)
        if request_id is not None:
            if start is None:
                start = self._follow(token_ids, num, request_id)
            else:
                self._offsets[request_id] = num - start
        if start is None:
            return []
        period = num - start  # past the end the copy repeats (a loop proposes a full k)
        return [token_ids[start + i % period] for i in range(k)]

    def _lookup(self, token_ids: Sequence[int], num: int, index: _TokenIndex) -> int | None:
        """Where the drafts start: after the most recent earlier occurrence of the longest suffix of
        token_ids[:num] (min_n..max_n tokens), or None."""
        candidates = index.positions.get(token_ids[num - 1])
        if not candidates:
            return None
        lo = max(0, num - self.max_lookback)  # the window searched: token_ids[lo:num]
        best_len, best_end = 0, -1
        for checked, e in enumerate(reversed(candidates)):
            if e < lo:
                break
            if checked == MAX_SCALAR_CANDIDATES:
                start = self._lookup_vectorized(np.asarray(token_ids[lo:num], dtype=np.int64))
                return None if start is None else lo + start
            n = 1  # tokens matched, ending at e and at num - 1
            while n < self.max_n and e - n >= lo and token_ids[e - n] == token_ids[num - 1 - n]:
                n += 1
            if n > best_len:  # ties keep the newest
                best_len, best_end = n, e
                if n == self.max_n:
                    break
        return best_end + 1 if best_len >= self.min_n else None

    def _follow(self, token_ids: Sequence[int], num: int, request_id: str) -> int | None:
        """Where the drafts start if the request still follows its last match's passage, else None."""
        offset = self._offsets.get(request_id)
        if offset is None or not 0 < offset < num:
            return None
        window = range(max(offset, num - FOLLOW_WINDOW), num)
        agree = sum(1 for t in window if token_ids[t] == token_ids[t - offset])
        if agree < FOLLOW_MIN_AGREEMENT * len(window):
            del self._offsets[request_id]  # the output left the passage
            return None
        return num - offset

    def _lookup_vectorized(self, tokens: np.ndarray) -> int | None:
        """The same search over a window as one numpy pass per n (the start within the window)."""
        num = len(tokens)
        ends = np.flatnonzero(tokens[: num - 1] == tokens[num - 1])
        for n in range(min(self.max_n, num - 1), self.min_n - 1, -1):
            cand = ends[ends >= n - 1]
            match = np.ones(cand.size, dtype=bool)
            for i in range(1, n):  # compare the n - 1 tokens before each candidate end
                match &= tokens[cand - i] == tokens[num - 1 - i]
            hits = cand[match]
            if hits.size:
                return int(hits[-1]) + 1
        return None

    def remove(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)
        self._offsets.pop(request_id, None)

    # -- the Proposer interface (proposer.py): host lookups, no KV, nothing on the device --------------
    device_drafts = None

    def kv_block_bytes(self) -> int:
        return 0

    def initialize_kv_cache(self, num_blocks: int) -> None:
        return None

    def remove_requests(self, request_ids: set[str]) -> None:
        for request_id in request_ids:
            self.remove(request_id)

    def launch_ahead(self, rows: Sequence[Any], sampled: torch.Tensor) -> None:
        return None

    def note_step(self, scheduler_output: SchedulerOutput) -> None:
        return None

    def propose_drafts(self, wanted: list[tuple[ScheduledRequest, int]], unverified: set[str]) -> dict[str, list[int]]:
        """A lookup per request (those that find nothing get no drafts)."""
        drafts = {}
        for sched, k in wanted:
            tokens = self.propose(sched.request.all_token_ids, k, sched.request_id)
            if tokens:
                drafts[sched.request_id] = tokens
        return drafts
