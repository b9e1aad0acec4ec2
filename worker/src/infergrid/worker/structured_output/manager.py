"""StructuredOutputManager: each constrained request's grammar matcher, and the step's token bitmask.

Lifecycle of a constrained request (engine sequence):

    add_request()      compiled grammar (from the cache the server filled) -> a GrammarMatcher
    every step         model runner: launch the forward pass, then fill_bitmask() on the host while
                       the device runs it; the sampler masks the logits with it
    after the step     accept_tokens() with the tokens the scheduler kept
    finished           remove_requests()

Speculative decoding: a request sampled at 1 + k rows (k drafts) gets the mask of row j from its
matcher after accepting drafts[:j]; a draft the grammar refuses leaves the later rows unmasked (they
are discarded: the refused draft has probability 0 at its row, so verification stops there). The
matcher is rolled back afterwards; accept_tokens() then applies what verification kept.

A step without constrained requests costs one dict lookup per sampling request (no bitmask).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from infergrid.worker.structured_output.grammar import GrammarCompiler
from infergrid.worker.structured_output.params import StructuredOutputsParams

logger = logging.getLogger(__name__)


class StructuredOutputManager:
    """Matchers of live constrained requests (engine thread only, except `compiler`)."""

    def __init__(self, compiler: GrammarCompiler, max_threads: int = 2) -> None:
        self.compiler = compiler
        self.vocab_size = compiler.vocab_size
        self._matchers: dict[str, Any] = {}
        self._max_threads = max_threads
        self._batch: Any = None
        self._bitmask: torch.Tensor | None = None
        self.num_fills_total = 0  # steps that filled a bitmask, and the host seconds they took
        self.fill_seconds_total = 0.0

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, params: StructuredOutputsParams) -> None:
        """Start a matcher for `request_id` (compiles unless the grammar is cached; GrammarError if bad)."""
        import xgrammar as xgr

        compiled, _ = self.compiler.compile(params)
        self._matchers[request_id] = xgr.GrammarMatcher(compiled)

    def remove_requests(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._matchers.pop(request_id, None)

    def is_constrained(self, request_id: str) -> bool:
        return request_id in self._matchers

    @property
    def has_requests(self) -> bool:
        return bool(self._matchers)

    def accept_tokens(self, request_id: str, token_ids: Sequence[int]) -> None:
        """Advance a request's matcher over the tokens it kept this step. A token the grammar refuses
        (it cannot be, but a stop token after a complete grammar ends the matcher) is logged."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return
        for token in token_ids:
            if matcher.is_terminated():
                break
            if not matcher.accept_token(int(token)):
                logger.warning("request %s: token %d does not follow its grammar", request_id, token)
                break

    # -- bitmask -----------------------------------------------------------------------------------
    def fill_bitmask(self, requests: Sequence[tuple[str, Sequence[int]]]) -> torch.Tensor | None:
        """The step's [num_rows, ceil(V / 32)] int32 bitmask (host memory), rows in sampling order:
        each (request id, draft ids) sampling request has 1 + len(drafts) rows. Rows of unconstrained
        requests allow everything. None when no request of the step is constrained."""
        if not self._matchers:
            return None
        matchers = self._matchers
        if not any(rid in matchers for rid, _ in requests):
            return None
        import xgrammar as xgr

        start = time.perf_counter()
        num_rows = sum(1 + len(drafts) for _, drafts in requests)
        bitmask = self._buffer(num_rows)
        bitmask.fill_(-1)
        fill: list[Any] = []
        fill_rows: list[int] = []
        row = 0
        speculative: list[tuple[str, Sequence[int], int]] = []
        for rid, drafts in requests:
            matcher = matchers.get(rid)
            if matcher is not None and not matcher.is_terminated():
                if drafts:
                    speculative.append((rid, drafts, row))
                else:
                    fill.append(matcher)
                    fill_rows.append(row)
            row += 1 + len(drafts)
        if fill:
            if self._batch is None:
                self._batch = xgr.BatchGrammarMatcher(self._max_threads)
            self._batch.batch_fill_next_token_bitmask(fill, bitmask, fill_rows)
        for rid, drafts, first_row in speculative:
            self._fill_drafts(matchers[rid], drafts, bitmask, first_row)
        self.num_fills_total += 1
        self.fill_seconds_total += time.perf_counter() - start
        return bitmask

    @staticmethod
    def _fill_drafts(matcher: Any, drafts: Sequence[int], bitmask: torch.Tensor, first_row: int) -> None:
        num_accepted = 0
        for j in range(len(drafts) + 1):
            if matcher.is_terminated():
                break
            matcher.fill_next_token_bitmask(bitmask, first_row + j)
            if j == len(drafts) or drafts[j] < 0 or not matcher.accept_token(int(drafts[j])):
                break
            num_accepted += 1
        if num_accepted:
            matcher.rollback(num_accepted)

    def _buffer(self, num_rows: int) -> torch.Tensor:
        """A reused host bitmask with at least num_rows rows (a view of its first num_rows)."""
        if self._bitmask is None or self._bitmask.shape[0] < num_rows:
            words = -(-self.vocab_size // 32)
            size = max(num_rows, 2 * (0 if self._bitmask is None else self._bitmask.shape[0]), 8)
            self._bitmask = torch.from_numpy(np.full((size, words), -1, dtype=np.int32))
        return self._bitmask[:num_rows]
