"""OutputProcessor: sampled tokens -> text, stop strings, logprobs -> RequestOutputs with deltas.

Each engine request (one sequence) has a `_SequenceState` with its detokenizer. A user request with
n > 1 is a `_ParentState` over n sequences (fanned out by the engine as separate seeded requests);
its RequestOutput lists all n CompletionOutputs in index order and is finished when all are.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from infergrid.worker.engine.request import Request
from infergrid.worker.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from infergrid.worker.runner.runner_output import ModelRunnerOutput, TokenLogprobs
from infergrid.worker.sampling_params import SamplingParams
from infergrid.worker.tokenizer import IncrementalDetokenizer


@dataclass
class _SequenceState:
    request_id: str
    index: int
    parent: _ParentState
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_chars: int = 0
    num_sent_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    metrics: RequestMetrics
    children: list[_SequenceState] = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.children)


class OutputProcessor:
    """Tracks every live sequence's text and builds the per-step RequestOutputs."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.sequences: dict[str, _SequenceState] = {}
        self.parents: dict[str, _ParentState] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        children: list[tuple[str, SamplingParams]],
        arrival_time: float,
    ) -> None:
        """Register a user request and its sequences (one per sample, in index order)."""
        parent = _ParentState(request_id, prompt, prompt_token_ids, RequestMetrics(arrival_time=arrival_time))
        for index, (child_id, params) in enumerate(children):
            detok = IncrementalDetokenizer(
                self.tokenizer,
                prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens,
            )
            state = _SequenceState(child_id, index, parent, params, detok)
            if params.logprobs is not None:
                state.logprobs, state.cumulative_logprob = [], 0.0
            parent.children.append(state)
            self.sequences[child_id] = state
        self.parents[request_id] = parent

    def child_ids(self, request_id: str) -> list[str]:
        parent = self.parents.get(request_id)
        return [c.request_id for c in parent.children] if parent else []

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a user request: unfinished samples get finish_reason "abort"; its state is dropped.
        Returns the final output (None for an unknown or already finished id)."""
        parent = self.parents.get(request_id)
        if parent is None:
            return None
        for state in parent.children:
            if not state.finished:
                state.finish_reason = "abort"
        return self._make_output(parent, time.monotonic())

    def has_unfinished(self) -> bool:
        return bool(self.parents)

    def process(
        self,
        scheduled_requests: Iterable[Request],
        runner_output: ModelRunnerOutput,
        finished_requests: Iterable[Request],
    ) -> tuple[list[RequestOutput], list[str]]:
        """Update the sequences touched this step. Returns (outputs, ids of sequences a stop string
        ended, which the caller must finish in the scheduler)."""
        now = time.monotonic()
        touched: dict[str, _ParentState] = {}
        stopped: list[str] = []
        for request in [*scheduled_requests, *finished_requests]:
            state = self.sequences.get(request.request_id)
            if state is None or state.finished:
                continue
            parent = state.parent
            if parent.metrics.first_scheduled_time is None:
                parent.metrics.first_scheduled_time = now
                parent.num_cached_tokens = request.num_cached_tokens
            new_tokens = request.output_token_ids[len(state.token_ids) :]
            is_done = request.is_finished
            if not new_tokens and not is_done:
                continue
            self._append_tokens(state, new_tokens, runner_output.logprobs.get(request.request_id))
            if new_tokens:
                if parent.metrics.first_token_time is None:
                    parent.metrics.first_token_time = now
                parent.metrics.last_token_time = now
                parent.metrics.num_generation_tokens += len(new_tokens)
            stop_str = state.detokenizer.update(new_tokens, finished=is_done)
            if stop_str is not None:
                state.finish_reason, state.stop_reason = "stop", stop_str
                if not is_done:
                    stopped.append(request.request_id)
            elif is_done:
                state.finish_reason, state.stop_reason = request.finish_reason, request.stop_reason
            touched[parent.request_id] = parent
        outputs = [self._make_output(parent, now) for parent in touched.values()]
        return outputs, stopped

    @staticmethod
    def _append_tokens(state: _SequenceState, new_tokens: list[int], logprobs: list[TokenLogprobs] | None) -> None:
        state.token_ids.extend(new_tokens)
        if state.logprobs is None or not logprobs:
            return
        for entry in logprobs[: len(new_tokens)]:
            ranked = {tid: Logprob(lp, rank) for rank, (tid, lp) in enumerate(
                zip(entry.token_ids[1:], entry.logprobs[1:], strict=True), start=1)}
            ranked[entry.token_ids[0]] = Logprob(entry.logprobs[0], entry.sampled_rank)
            for tid, lp in ranked.items():
                lp.decoded_token = state.detokenizer.decode_token(tid)
            state.logprobs.append(ranked)
            state.cumulative_logprob = (state.cumulative_logprob or 0.0) + entry.logprobs[0]

    def _make_output(self, parent: _ParentState, now: float) -> RequestOutput:
        completions = []
        for state in parent.children:
            text = state.detokenizer.streamable_text(state.finished)
            completions.append(CompletionOutput(
                index=state.index,
                text=text,
                token_ids=list(state.token_ids),
                cumulative_logprob=state.cumulative_logprob,
                logprobs=list(state.logprobs) if state.logprobs is not None else None,
                finish_reason=state.finish_reason,
                stop_reason=state.stop_reason,
                delta_text=text[state.num_sent_chars :],
                delta_token_ids=state.token_ids[state.num_sent_tokens :],
            ))
            state.num_sent_chars, state.num_sent_tokens = len(text), len(state.token_ids)
        finished = parent.finished
        if finished:
            parent.metrics.finished_time = now
            self.parents.pop(parent.request_id, None)
            for child in parent.children:
                self.sequences.pop(child.request_id, None)
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=parent.num_cached_tokens,
            metrics=parent.metrics,
        )

