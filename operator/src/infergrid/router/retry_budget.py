"""A retry budget (Finagle's RetryBudget): each request deposits `ratio` tokens, each retry withdraws
one, so retries stay under ~ratio x requests over time and mass failure is not amplified. A small
reserve lets a lightly loaded router still retry."""

from __future__ import annotations


class RetryBudget:
    def __init__(self, ratio: float = 0.2, reserve: float = 10.0, cap: float = 100.0) -> None:
        self.ratio, self.cap = ratio, cap
        self.tokens = reserve

    def on_request(self) -> None:
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def try_withdraw(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
