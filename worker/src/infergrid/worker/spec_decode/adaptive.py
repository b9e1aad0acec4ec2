"""Adaptive number of draft tokens per request, so that speculation is never a net loss.

Each request keeps an exponentially weighted count of verified drafts: accepted ones and trials
(accepted + the one rejection that ends a run), so `rate = accepted / trials` estimates the chance
that a draft token is accepted. With acceptance rate a and k drafts a step emits, on average,

    E[tokens](a, k) = 1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a)

for a cost of about 1 + k * c steps, where c is one draft token's cost relative to the request's
share of a step; c grows with the batch size (cost_model.py), so the same acceptance can pay at
batch 1 and not at batch 64. k is the argmax of E / cost over 0..max_k, re-chosen every step
(whether the step as a whole pays against running pipelined is the speculative decoder's
batch-level check: cost_model.StepCostModel.speculation_pays).

k = 0 switches a request off: it proposes nothing (no host work, no draft-model pass, and with
every request off the engine pipelines its steps). An off request is *checked in hindsight* at
its next check step: the proposer is run over the request's last few emitted tokens (the n-gram
lookup on the host, the draft model as one catch-up pass queued behind the running step) and the
share of positions at which it would have proposed the token the target then emitted is observed
like a verification (speculative_decoder.py). A check needs no draft to be verified, so it never
makes a step synchronous: a request whose drafts keep failing costs one cheap check every
MAX_BACKOFF steps (the wait doubles from MIN_BACKOFF after each check that leaves it off), and one
whose text becomes predictable (a loop, a quoted passage) gets speculation back. Check steps are
multiples of the wait, so checks of different requests fall on the same steps.

A proposer that finds nothing to propose for a request that is on (no n-gram match) is a *miss*: it
counts as a verification whose first draft was rejected (the step emits one token for the request,
and in a batch that speculates, it pays for the synchronous step without gaining). So the rate
covers both ways drafts fail, a request whose lookups keep missing goes off like one whose drafts
keep failing, and one miss (an edit in a quoted passage: the text after it matches again) does not
switch a request off on its own.

A request switched on proposes from `on_from` on: at once after a synchronous step, two steps later
after a pipelined one (its next step is already running without drafts; the one after it is
scheduled synchronously, because a request is on). A new request starts from the engine's recent
acceptance (a draft model that has been failing every request starts off, one that has been
accepted starts on at once, and one that starts off gets its first check `new_off_wait` steps on:
NEW_OFF_WAIT for a draft model, whose first check catches up on the whole prompt, MIN_BACKOFF for
n-gram lookup, whose checks are free; `failing_off_wait` while the engine-wide rate is below
FAILING_ENGINE_RATE: MAX_BACKOFF for a draft model, whose checks then cost without finding anything
(an eager catch-up pass over the request's tokens: ~1.3-2 ms of host time on an H200 host, so ~2 of
them per 128-token request made a random draft 0.96x at batch 1; at MAX_BACKOFF about one in two
such requests is checked, and whatever runs across a multiple of MAX_BACKOFF engine steps still is,
so a workload that turns predictable is found again); a
seeded sampled request starts from the default prior and counts its own steps, so that its drafts
depend on nothing but its own history.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass

DEFAULT_DECAY = 0.8
DEFAULT_PRIOR_RATE = 0.7
DEFAULT_PRIOR_WEIGHT = 1.0
ENGINE_PRIOR_DECAY = 0.98  # per observation: the engine-wide rate follows the last ~50 verifications/checks
MIN_BACKOFF, MAX_BACKOFF = 8, 256
NEW_OFF_WAIT = 4 * MIN_BACKOFF  # default wait for the first check of a new request that starts off
FAILING_ENGINE_RATE = 0.1  # below this engine-wide rate, a new request that starts off waits failing_off_wait
CHECK = -1  # num_drafts(): the request is due for a hindsight check (observe_check() takes the result)


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
    on_from: int  # while on: the first step at which it proposes; -1 while off
    next_check: int  # while off: the step of its next hindsight check
    wait: int = MIN_BACKOFF  # how long the next switch-off lasts, at least
    num_steps: int = 0  # the request's own clock (num_drafts without a step)
    has_own_clock: bool = False
    checking: bool = False  # a check was asked for and its result is not in yet


def _next_multiple(step: int, n: int) -> int:
    return (step // n + 1) * n


class AdaptiveNumDrafts:
    """Chooses each request's number of drafts from its acceptance history and the current cost.

    Args:
        max_k: num_speculative_tokens (the most drafts per step).
        decay: EWMA factor per verification (older observations fade).
        prior_rate / prior_weight: the starting estimate and how many trials it is worth.
        enabled: False = always max_k (no adaptation, no checks).
        new_off_wait: steps to the first check of a new request that starts off (the engine's recent
            acceptance is low): longer where a check costs device work.
        failing_off_wait: the same while the engine-wide rate is below FAILING_ENGINE_RATE (default
            twice new_off_wait).
    """

    def __init__(
        self,
        max_k: int,
        decay: float = DEFAULT_DECAY,
        prior_rate: float = DEFAULT_PRIOR_RATE,
        prior_weight: float = DEFAULT_PRIOR_WEIGHT,
        enabled: bool = True,
        new_off_wait: int = NEW_OFF_WAIT,
        failing_off_wait: int | None = None,
    ) -> None:
        if max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {max_k}")
        self.max_k, self.decay = max_k, decay
        self.prior_rate, self.prior_weight = prior_rate, prior_weight
        self.enabled, self.new_off_wait = enabled, new_off_wait
        self.failing_off_wait = 2 * new_off_wait if failing_off_wait is None else failing_off_wait
        self._states: dict[str, _RequestState] = {}
        self._engine_accepted, self._engine_trials = prior_rate, 1.0  # the engine-wide rate (new requests' prior)
        self._num_on = 0
        self._next_event: int | None = None  # the earliest check step of an off request (None: stale)

    # -- decisions ---------------------------------------------------------------------------------
    def num_drafts(self, req_id: str, draft_cost: float, step: int | None, plain_goodput: float = 1.0,
                   now: bool = True) -> int:
        """Drafts to propose for this request now (call once per step in which it sampled), or CHECK.

        `draft_cost` is c above at this step's batch size. `step` is the engine's step count, so that
        different requests' checks fall on the same steps; None counts the request's own steps
        instead, so that its drafts depend on nothing but its own history and `draft_cost` (a seeded
        sampled request's random draws depend on its drafts). `now`: whether the step just finished
        was synchronous (drafts proposed now can be verified by the next step)."""
        if not self.enabled:
            return self.max_k
        state = self._states.get(req_id)
        if state is None:  # on (proposing from a later step) or off, from the prior alone
            state = self._new_state(req_id, step)
            self._decide(state, draft_cost, step, plain_goodput, now, is_new=True)
        if step is None:
            step = state.num_steps
            state.num_steps += 1
        if state.on_from < 0:  # off
            if step < state.next_check or state.checking:
                return 0
            if draft_cost >= 1.0:  # not even perfect drafts would pay now: look again later
                self._switch_off(state, _next_multiple(step, MIN_BACKOFF), double=False)
                return 0
            state.checking = True
            return CHECK
        if step < state.on_from:  # just switched on: its next step runs without drafts
            return 0
        k = best_num_drafts(state.accepted / state.trials, self.max_k, draft_cost, plain_goodput)
        if not k:
            self._switch_off(state, _next_multiple(step, state.wait))
        return k

    def observe_check(self, req_id: str, num_matched: float, num_positions: int, draft_cost: float,
                      step: int | None, plain_goodput: float = 1.0, now: bool = True) -> None:
        """The result of a hindsight check: at `num_positions` positions the proposer would have
        proposed the emitted token `num_matched` times (a probability sum for sampled requests).
        Updates the estimate and switches the request on or off (a new check then waits longer)."""
        state = self._states.get(req_id)
        if state is None or not self.enabled:
            return
        state.checking = False
        if num_positions > 0:
            self._observe(state, num_matched, num_positions)
        self._decide(state, draft_cost, step, plain_goodput, now)

    def observe(self, req_id: str, num_drafts: int, num_accepted: int) -> None:
        """Record one verification: `num_accepted` of `num_drafts` drafts were accepted."""
        state = self._states.get(req_id)
        if state is None or num_drafts <= 0:
            return
        rejected = 1 if num_accepted < num_drafts else 0
        self._observe(state, num_accepted, num_accepted + rejected)
        if num_accepted:  # it pays off: the next switch-off starts from the shortest wait again
            state.wait = MIN_BACKOFF

    def miss(self, req_id: str) -> None:
        """The proposer found nothing to propose for this request (no n-gram match): observed as a
        verification whose first draft was rejected (the next num_drafts() decides on or off)."""
        state = self._states.get(req_id)
        if state is not None and self.enabled and state.on_from >= 0:
            self._observe(state, 0.0, 1.0)

    def switch_off(self, req_id: str, step: int | None) -> None:
        """Switch an on request off, its wait doubled: the step as a whole would not pay (the batch-level
        check)."""
        state = self._states.get(req_id)
        if state is None or not self.enabled or state.on_from < 0:
            return
        self._switch_off(state, _next_multiple(state.num_steps if step is None else step, state.wait))

    def remove(self, req_id: str) -> None:
        state = self._states.pop(req_id, None)
        if state is not None and state.on_from >= 0:
            self._num_on -= 1
        self._next_event = None

    # -- queries -----------------------------------------------------------------------------------
    @property
    def any_on(self) -> bool:
        """Whether some request may propose drafts (the engine must not pipeline its next step)."""
        return not self.enabled or self._num_on > 0

    def can_skip(self, step: int, req_ids: Set[str]) -> bool:
        """True when calling num_drafts(req_id, any cost, step) for every one of `req_ids` would return 0
        and change nothing: all are known, all off on the engine's clock, none due for a check.
        O(1) per step while that lasts (the bound is recomputed after a state changes)."""
        if not self.enabled or self._num_on:
            return False
        if self._next_event is None:
            self._next_event = min(
                (-1 if s.has_own_clock else s.next_check for s in self._states.values()), default=1 << 62
            )
        return step < self._next_event and self._states.keys() >= req_ids

    def acceptance_rate(self, req_id: str) -> float:
        state = self._states.get(req_id)
        return self.prior_rate if state is None else state.accepted / state.trials

    def engine_rate(self) -> float:
        """The engine-wide acceptance of recent verifications and checks (new requests' prior)."""
        return self._engine_accepted / self._engine_trials

    def is_on(self, req_id: str) -> bool:
        state = self._states.get(req_id)
        return state is not None and state.on_from >= 0

    # -- internals ---------------------------------------------------------------------------------
    def _new_state(self, req_id: str, step: int | None) -> _RequestState:
        rate = self.prior_rate if step is None else self.engine_rate()
        first_check = MIN_BACKOFF if step is None else _next_multiple(step + MIN_BACKOFF // 2, MIN_BACKOFF)
        state = _RequestState(rate * self.prior_weight, self.prior_weight, -1, first_check, has_own_clock=step is None)
        self._states[req_id] = state
        self._next_event = None
        return state

    def _observe(self, state: _RequestState, accepted: float, trials: float) -> None:
        state.accepted = self.decay * state.accepted + accepted
        state.trials = self.decay * state.trials + trials
        if not state.has_own_clock:
            self._engine_accepted = ENGINE_PRIOR_DECAY * self._engine_accepted + accepted
            self._engine_trials = ENGINE_PRIOR_DECAY * self._engine_trials + trials

    def _decide(self, state: _RequestState, draft_cost: float, step: int | None, plain_goodput: float, now: bool,
                is_new: bool = False) -> None:
        """On or off from the estimate (after a check, or for a new request).

        NOTE: switched on at engine step s, a request proposes from s + 1 when the step just finished
        was synchronous (the next one is scheduled after this call, seeing it on), else from s + 2. On
        its own clock it skips its next two own steps whatever the engine did: its first drafts then
        come at the same own step in any batch."""
        k = 0 if draft_cost >= 1.0 else best_num_drafts(state.accepted / state.trials, self.max_k, draft_cost,
                                                         plain_goodput)
        if not k:
            if not is_new:
                self._switch_off(state, _next_multiple(state.num_steps if step is None else step, state.wait))
            elif step is not None:  # the engine's recent requests failed: this one is checked later too
                # ... later still where nearly nothing has been accepted lately (each check of a draft
                # model catches up on every token since the request's last pass).
                wait = self.failing_off_wait if self.engine_rate() < FAILING_ENGINE_RATE else self.new_off_wait
                state.wait = min(wait, MAX_BACKOFF)
                state.next_check = _next_multiple(step + MIN_BACKOFF // 2, state.wait)
            return
        if state.on_from < 0:
            self._num_on += 1
            self._next_event = None
        state.on_from = state.num_steps + 2 if step is None else step + (1 if now else 2)

    def _switch_off(self, state: _RequestState, next_check: int, double: bool = True) -> None:
        if state.on_from >= 0:
            self._num_on -= 1
        state.on_from, state.next_check = -1, next_check
        if double:
            state.wait = min(2 * state.wait, MAX_BACKOFF)
        self._next_event = None
