"""Adaptive number of draft tokens per request, so that speculation is never a net loss.

Each request keeps an exponentially weighted count of verified drafts: accepted ones and trials
(accepted + the one rejection that ends a run), so `rate = accepted / trials` estimates the chance
that a draft token is accepted. With acceptance rate a and k drafts a step emits, on average,

    E[tokens](a, k) = 1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a)

for a cost of about 1 + k * c target-step units (c = one draft token's cost: the draft model's
share of a target forward pass plus the verifier's marginal cost). k is the argmax of
E / cost over 0..max_k; k = 0 switches speculation off for the request. An off request probes
again with one draft after `backoff` steps (doubling after each failed probe), so a request whose
text becomes predictable (a loop, a quoted passage) gets speculation back.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_DECAY = 0.8
DEFAULT_PRIOR_RATE = 0.7
DEFAULT_PRIOR_WEIGHT = 2.0
MIN_BACKOFF, MAX_BACKOFF = 4, 64


def expected_tokens(rate: float, k: int) -> float:
    """Mean tokens emitted per step with k drafts, each accepted with probability `rate`."""
    if rate >= 1.0:
        return float(k + 1)
    return (1.0 - rate ** (k + 1)) / (1.0 - rate)


def best_num_drafts(rate: float, max_k: int, draft_cost: float) -> int:
    """argmax over k in 0..max_k of expected_tokens(rate, k) / (1 + k * draft_cost); 0 = off."""
    best_k, best = 0, 1.0
    for k in range(1, max_k + 1):
        goodput = expected_tokens(rate, k) / (1.0 + k * draft_cost)
        if goodput > best * (1.0 + 1e-9):
            best_k, best = k, goodput
    return best_k


@dataclass
class _RequestState:
    accepted: float
    trials: float
    k: int  # best_num_drafts for the current rate
    num_steps_off: int = 0
    backoff: int = MIN_BACKOFF

    @property
    def rate(self) -> float:
        return self.accepted / self.trials if self.trials > 0 else 0.0


class AdaptiveNumDrafts:
    """Chooses each request's number of drafts from its acceptance history.

    Args:
        max_k: num_speculative_tokens (the most drafts per step).
        draft_cost: c above, in target-step units per draft token.
        decay: EWMA factor per verification (older observations fade).
        prior_rate / prior_weight: the starting estimate and how many trials it is worth.
        enabled: False = always max_k (no adaptation).
    """

    def __init__(
        self,
        max_k: int,
        draft_cost: float,
        decay: float = DEFAULT_DECAY,
        prior_rate: float = DEFAULT_PRIOR_RATE,
        prior_weight: float = DEFAULT_PRIOR_WEIGHT,
        enabled: bool = True,
    ) -> None:
        if max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {max_k}")
        self.max_k, self.draft_cost, self.decay = max_k, draft_cost, decay
        self.prior_rate, self.prior_weight = prior_rate, prior_weight
        self.enabled = enabled
        self._states: dict[str, _RequestState] = {}

    def _state(self, req_id: str) -> _RequestState:
        state = self._states.get(req_id)
        if state is None:
            state = _RequestState(self.prior_rate * self.prior_weight, self.prior_weight, 0)
            state.k = best_num_drafts(state.rate, self.max_k, self.draft_cost)
            self._states[req_id] = state
        return state

    def num_drafts(self, req_id: str) -> int:
        """Drafts to propose for this request now (call once per step it could speculate)."""
        if not self.enabled:
            return self.max_k
        state = self._state(req_id)
        if state.k > 0:
            return state.k
        state.num_steps_off += 1
        if state.num_steps_off >= state.backoff:  # probe
            state.num_steps_off = 0
            state.backoff = min(2 * state.backoff, MAX_BACKOFF)
            return 1
        return 0

    def observe(self, req_id: str, num_drafts: int, num_accepted: int) -> None:
        """Record one verification: `num_accepted` of `num_drafts` drafts were accepted."""
        if num_drafts <= 0:
            return
        state = self._state(req_id)
        rejected = 1 if num_accepted < num_drafts else 0
        state.accepted = self.decay * state.accepted + num_accepted
        state.trials = self.decay * state.trials + num_accepted + rejected
        state.k = best_num_drafts(state.rate, self.max_k, self.draft_cost)
        if state.k > 0:
            state.backoff, state.num_steps_off = MIN_BACKOFF, 0

    def acceptance_rate(self, req_id: str) -> float:
        return self._state(req_id).rate

    def remove(self, req_id: str) -> None:
        self._states.pop(req_id, None)
