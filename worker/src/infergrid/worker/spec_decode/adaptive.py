"""Adaptive number of draft tokens per request, so that speculation is never a net loss.

Each request keeps an exponentially weighted count of verified drafts: accepted ones and trials
(accepted + the one rejection that ends a run), so `rate = accepted / trials` estimates the chance
that a draft token is accepted. With acceptance rate a and k drafts a step emits, on average,

    E[tokens](a, k) = 1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a)

for a cost of about 1 + k * c steps, where c is one draft token's cost relative to the request's
share of a step; c grows with the batch size (cost_model.py), so the same acceptance can pay at
batch 1 and not at batch 64. k is the argmax of E / cost over 0..max_k, re-chosen every step.

k = 0 switches a request off: it proposes nothing (no host work, no draft-model pass) until its
next probe, one draft. A probe whose draft is accepted turns it (back) on, and k follows the
estimate from there; a rejected probe switches it off at once (an estimate still near the prior
would keep a hopeless request drafting for a few more steps) and doubles the wait; a probe not
verified yet (the draft model still catching up on a long prompt) stays pending (MIN_BACKOFF, 2x, ... MAX_BACKOFF), so a request whose drafts keep failing costs a
one-draft probe every MAX_BACKOFF steps, and one whose text becomes predictable (a loop, a quoted
passage) gets speculation back. A new request starts off, its first probe due at the next multiple
of MIN_BACKOFF steps.

Probes fall on steps that are multiples of the wait, so requests probe together: a probe's cost is
mostly per step (a draft-model pass, the verification path for the whole batch), and a large batch
of unrelated requests (arriving every few steps) would otherwise pay it nearly every step. Where
c >= 1 not even perfect drafts pay ((k + 1) / (1 + k c) <= 1), and a due probe waits for the next
multiple of MIN_BACKOFF instead.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass

DEFAULT_DECAY = 0.8
DEFAULT_PRIOR_RATE = 0.7
DEFAULT_PRIOR_WEIGHT = 1.0
MIN_BACKOFF, MAX_BACKOFF = 8, 256


def expected_tokens(rate: float, k: int) -> float:
    """Mean tokens emitted per step with k drafts, each accepted with probability `rate`."""
    if rate >= 1.0:
        return float(k + 1)
    return (1.0 - rate ** (k + 1)) / (1.0 - rate)


def best_num_drafts(rate: float, max_k: int, draft_cost: float, plain_goodput: float = 1.0) -> int:
    """argmax over k in 0..max_k of expected_tokens(rate, k) / (1 + k * draft_cost); 0 = off, whose
    goodput is `plain_goodput` (above 1 where steps without speculation run pipelined)."""
    best_k, best = 0, plain_goodput
    for k in range(1, max_k + 1):
        goodput = expected_tokens(rate, k) / (1.0 + k * draft_cost)
        if goodput > best * (1.0 + 1e-9):
            best_k, best = k, goodput
    return best_k


@dataclass(slots=True)
class _RequestState:
    accepted: float
    trials: float
    next_probe: int  # while off: the step of the next probe; -1 while on
    wait: int = MIN_BACKOFF  # how long the next switch-off lasts, at least
    num_steps: int = 0  # the request's own clock (num_drafts without a step)
    has_own_clock: bool = False
    probing: bool = False  # its last draft was a probe, not yet judged
    probe_accepted: int = -1  # drafts the probe's verification accepted (-1: not verified yet)


def _next_multiple(step: int, n: int) -> int:
    return (step // n + 1) * n


class AdaptiveNumDrafts:
    """Chooses each request's number of drafts from its acceptance history and the current cost.

    Args:
        max_k: num_speculative_tokens (the most drafts per step).
        decay: EWMA factor per verification (older observations fade).
        prior_rate / prior_weight: the starting estimate and how many trials it is worth.
        enabled: False = always max_k (no adaptation).
    """

    def __init__(
        self,
        max_k: int,
        decay: float = DEFAULT_DECAY,
        prior_rate: float = DEFAULT_PRIOR_RATE,
        prior_weight: float = DEFAULT_PRIOR_WEIGHT,
        enabled: bool = True,
    ) -> None:
        if max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {max_k}")
        self.max_k, self.decay = max_k, decay
        self.prior_rate, self.prior_weight = prior_rate, prior_weight
        self.enabled = enabled
        self._states: dict[str, _RequestState] = {}
        self._quiet_until: int | None = None  # engine steps before it: every known request off (None: stale)

    def num_drafts(self, req_id: str, draft_cost: float, step: int | None, plain_goodput: float = 1.0) -> int:
        """Drafts to propose for this request now (call once per step in which it sampled).

        `draft_cost` is c above at this step's batch size. `step` is the engine's step count, so that
        different requests' probes fall on the same steps; None counts the request's own steps
        instead, so that its drafts depend on nothing but its own history and `draft_cost` (a seeded
        sampled request's random draws depend on its drafts)."""
        if not self.enabled:
            return self.max_k
        self._quiet_until = None
        state = self._states.get(req_id)
        if state is None:
            first_probe = 0 if step is None else -(-step // MIN_BACKOFF) * MIN_BACKOFF
            state = self._states[req_id] = _RequestState(self.prior_rate * self.prior_weight, self.prior_weight,
                                                         first_probe, has_own_clock=step is None)
        if step is None:
            step = state.num_steps
            state.num_steps += 1
        if state.next_probe >= 0:  # off
            if step < state.next_probe:
                return 0
            if draft_cost >= 1.0:  # not even perfect drafts would pay now: look again later
                state.next_probe = _next_multiple(step, MIN_BACKOFF)
                return 0
            state.next_probe, state.probing, state.probe_accepted = -1, True, -1
            return 1  # the probe; the next call decides with its result
        if state.probing:
            if state.probe_accepted < 0:  # not verified (the draft model still catching up, no n-gram match)
                return 1
            state.probing = False
            if state.probe_accepted == 0:  # rejected: off again, twice as long
                state.next_probe, state.wait = _next_multiple(step, state.wait), min(2 * state.wait, MAX_BACKOFF)
                return 0
        k = best_num_drafts(state.accepted / state.trials, self.max_k, draft_cost, plain_goodput)
        if k:
            state.wait = MIN_BACKOFF
        else:
            state.next_probe, state.wait = _next_multiple(step, state.wait), min(2 * state.wait, MAX_BACKOFF)
        return k

    def no_draft(self, req_id: str, step: int | None) -> None:
        """The proposer found nothing to propose for a request that asked for drafts (no n-gram
        match): like a rejected probe, it goes off and its wait doubles (a step that verifies
        nothing still costs the pipelining every step without speculation gets)."""
        state = self._states.get(req_id)
        if state is None or not self.enabled:
            return
        if step is None:
            step = state.num_steps
        state.probing = False
        state.next_probe, state.wait = _next_multiple(step, state.wait), min(2 * state.wait, MAX_BACKOFF)
        self._quiet_until = None

    def can_skip(self, step: int, req_ids: Set[str]) -> bool:
        """True when calling num_drafts(req_id, any cost, step) for every one of `req_ids` would return 0
        and change nothing: all are known, all off on the engine's clock, none due for a probe.
        O(1) per step while that lasts (the bound is recomputed after a num_drafts call)."""
        if not self.enabled:
            return False
        if self._quiet_until is None:
            self._quiet_until = min(
                (s.next_probe if s.next_probe >= 0 and not s.has_own_clock else -1 for s in self._states.values()),
                default=1 << 62,
            )
        return step < self._quiet_until and self._states.keys() >= req_ids

    def observe(self, req_id: str, num_drafts: int, num_accepted: int) -> None:
        """Record one verification: `num_accepted` of `num_drafts` drafts were accepted."""
        state = self._states.get(req_id)
        if state is None or num_drafts <= 0:
            return
        if state.probing:
            state.probe_accepted = num_accepted
        rejected = 1 if num_accepted < num_drafts else 0
        state.accepted = self.decay * state.accepted + num_accepted
        state.trials = self.decay * state.trials + num_accepted + rejected

    def acceptance_rate(self, req_id: str) -> float:
        state = self._states.get(req_id)
        return self.prior_rate if state is None else state.accepted / state.trials

    def remove(self, req_id: str) -> None:
        self._states.pop(req_id, None)
