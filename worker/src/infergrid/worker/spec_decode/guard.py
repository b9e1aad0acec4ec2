"""SpeculationGuard: which requests propose drafts (always k of them) and when nobody will.

Speculation runs at a fixed k (the engine's num_speculative_tokens). Adaptive controllers that chose k
per request and per step from a cost model lost to a fixed k in this project's own measurements (batch
32, acceptance ~0.6: adaptive 0.77-0.87x against fixed 1.03x on an H200, 0.95x against 1.25x on a CPU),
so only two guards remain, for the two cases where speculating is slower than not:

- Large batches: a step whose requests that sample number more than `disable_by_batch_size` proposes
  no drafts (EngineConfig.speculative_disable_by_batch_size). A speculating step is synchronous and
  verifies 1 + k tokens per request; at a large batch the step is no longer memory-bound and the
  pipelining it gives up costs more than the drafts save.
- Poor acceptance: a request whose drafts were accepted less than MIN_MEAN_ACCEPTED per verification
  on average over its last WINDOW verifications (judged from its MIN_VERIFICATIONS-th on, so that
  drafts that always fail cost few steps; a proposal that found nothing counts as a verification with
  none accepted) stops speculating for a cool-down of COOL_DOWN_STEPS, doubling each time it fails
  again (at most MAX_COOL_DOWN_STEPS; back to COOL_DOWN_STEPS once a full window passes), then tries
  again.
  (Random text, no draft accepted, measured 0.88x of off at batch 32 on an H100 under the old controller.)

Clocks, so that decisions are deterministic (steps, never time):

- A request on the engine's clock (`step`: one per `end_step`) resumes at a multiple of its cool-down
  length, so that requests cooling down together resume together and the engine pipelines in between.
- A seeded sampled request (`own_clock`) counts its own sampling steps and ignores the batch cutoff:
  its random draws follow its drafts, which therefore must not depend on other requests. It starts
  proposing at its own step OWN_CLOCK_LEAD (see `is_quiet`).

`is_quiet` tells the engine that no request will want drafts at the next two `end_step`s, so the step
about to be scheduled may run pipelined (ahead of its predecessor's tokens, whose proposal then finds
it already scheduled). An idle engine is not quiet, so that new requests draft right after their
prefill. It is exact for own-clock requests: one whose cool-down ends at own step t makes
the engine unquiet from its own step t - 2 on, so its step t is synchronous in any batch. A request on
the engine's clock that wants drafts after a pipelined step (a new one, or the batch shrank below the
cutoff) just waits for the next synchronous step, which its wanting forces.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WINDOW = 8  # verifications a request's acceptance is judged over (the most recent ones)
MIN_VERIFICATIONS = 4  # ... from this many on (after a start or a cool-down)
# Accepted drafts per verification below which a request stops speculating: fewer than one extra token
# every two steps does not pay for the synchronous step and the proposer's work (at k = 4 that is a
# per-draft acceptance below ~0.35).
MIN_MEAN_ACCEPTED = 0.5
COOL_DOWN_STEPS, MAX_COOL_DOWN_STEPS = 16, 256
OWN_CLOCK_LEAD = 2  # own steps before a new seeded sampled request proposes (two steps may be in flight)


@dataclass(slots=True)
class _RequestState:
    own_clock: bool
    resume_at: int  # the clock value from which it may propose
    num_steps: int = 0  # own sampling steps so far (the clock of an own-clock request)
    cool_down: int = COOL_DOWN_STEPS  # the length of its next cool-down
    accepted: deque[int] = field(default_factory=lambda: deque(maxlen=WINDOW))


def _resume_step(now: int, cool_down: int) -> int:
    """The first multiple of `cool_down` at least `cool_down` steps after `now`."""
    return -(-(now + cool_down) // cool_down) * cool_down


class SpeculationGuard:
    """Per step: `begin_step(batch)`, then `wants_drafts` for each running request that sampled (in any
    order, once each) and `observe` for each verification or empty proposal, then `end_step()`.

    Args:
        disable_by_batch_size: the most requests sampling in a step for which drafts are proposed
            (>= 1; a value >= max_num_seqs never disables).
    """

    def __init__(self, disable_by_batch_size: int) -> None:
        if isinstance(disable_by_batch_size, bool) or not isinstance(disable_by_batch_size, int) \
                or disable_by_batch_size < 1:
            raise ValueError(f"disable_by_batch_size must be an integer >= 1, got {disable_by_batch_size!r}")
        self.disable_by_batch_size = disable_by_batch_size
        self.step = 0  # end_step() calls so far: the engine's clock
        self.is_over_cutoff = False  # the current (or, between steps, the last) step's batch
        self._is_quiet = False
        self.num_cool_downs_total = 0
        self.num_steps_over_cutoff_total = 0
        self._states: dict[str, _RequestState] = {}

    def begin_step(self, num_sampling: int) -> None:
        """A step in which `num_sampling` running requests sampled."""
        self.is_over_cutoff = num_sampling > self.disable_by_batch_size
        self.num_steps_over_cutoff_total += self.is_over_cutoff

    def wants_drafts(self, req_id: str, own_clock: bool = False) -> bool:
        """Whether this request (which sampled this step) proposes k drafts for the next one; advances
        an own-clock request's clock, so call it once per step in which the request samples."""
        state = self._states.get(req_id)
        if state is None:
            state = _RequestState(own_clock, OWN_CLOCK_LEAD if own_clock else 0)
            self._states[req_id] = state
        if state.own_clock:
            now = state.num_steps
            state.num_steps += 1
            return now >= state.resume_at
        return not self.is_over_cutoff and self.step >= state.resume_at

    def observe(self, req_id: str, num_accepted: int) -> None:
        """One verification of the request's drafts accepted `num_accepted` of them (0 also for a
        proposal that found nothing); a poor window starts a cool-down."""
        state = self._states.get(req_id)
        if state is None:
            return
        state.accepted.append(num_accepted)
        num_verified = len(state.accepted)
        if num_verified < MIN_VERIFICATIONS:
            return
        if sum(state.accepted) >= MIN_MEAN_ACCEPTED * num_verified:
            if num_verified == WINDOW:  # a full window passed: the next failure starts over
                state.cool_down = COOL_DOWN_STEPS
            return
        now = state.num_steps if state.own_clock else self.step
        state.resume_at = _resume_step(now, state.cool_down)
        state.cool_down = min(2 * state.cool_down, MAX_COOL_DOWN_STEPS)
        state.accepted.clear()
        self.num_cool_downs_total += 1

    def end_step(self) -> None:
        """The step's decisions are made: advance the engine's clock and decide `is_quiet`."""
        self.step += 1
        self._is_quiet = not any(self._may_want_soon(s) for s in self._states.values())

    @property
    def is_quiet(self) -> bool:
        """Whether no request will want drafts at the next two steps (see the module docstring). False
        while no request is known: new requests on the engine's clock want drafts after their prefill."""
        return self._is_quiet and bool(self._states)

    def remove(self, req_id: str) -> None:
        self._states.pop(req_id, None)

    def is_cooling_down(self, req_id: str) -> bool:
        state = self._states.get(req_id)
        if state is None:
            return False
        return (state.num_steps if state.own_clock else self.step) < state.resume_at

    def describe(self) -> str:
        num_cooling = sum(self.is_cooling_down(r) for r in self._states)
        return (f"{len(self._states)} requests, {num_cooling} cooling down, {self.num_cool_downs_total} cool-downs, "
                f"{self.num_steps_over_cutoff_total} of {self.step} steps over the batch cutoff "
                f"({self.disable_by_batch_size})")

    def _may_want_soon(self, state: _RequestState) -> bool:
        """Whether the request may want drafts at one of the next two steps (the one the engine is
        about to schedule and the one in flight, if any)."""
        if state.own_clock:
            return state.resume_at <= state.num_steps + 1
        return not self.is_over_cutoff and state.resume_at <= self.step + 1
