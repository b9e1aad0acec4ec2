"""Bounded admission: at most `max_queue_size` engine sequences (waiting + running) in flight; a
request weighs prompts x n.

Anything beyond is refused at once with 429 + Retry-After, so an overloaded worker answers fast
instead of piling up connections. While the server is loading or draining every new request gets 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import APIError

RETRY_AFTER_S = 1


class AdmissionController:
    """Counts in-flight engine requests; refuses new ones when full or not accepting."""

    def __init__(self, max_queue_size: int) -> None:
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self.max_queue_size = max_queue_size
        self.num_in_flight = 0
        self.num_rejected: dict[str, int] = {"queue_full": 0, "not_ready": 0, "draining": 0}
        self._closed_reason: str | None = "not_ready"
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def is_accepting(self) -> bool:
        """True when new requests may be admitted (ready, not draining)."""
        return self._closed_reason is None

    def open(self) -> None:
        """Start admitting (the model is loaded and warmed up)."""
        self._closed_reason = None

    def close(self, reason: str) -> None:
        """Stop admitting; `reason` is "draining" or "not_ready"."""
        self._closed_reason = reason

    def check(self, weight: int = 1) -> None:
        """Raise the APIError a request of `weight` engine requests would get now, if any."""
        if self._closed_reason is not None:
            self.num_rejected[self._closed_reason] = self.num_rejected.get(self._closed_reason, 0) + 1
            message = ("Server is shutting down" if self._closed_reason == "draining"
                       else "Model is not ready yet")
            raise APIError(503, message, code=self._closed_reason,
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        if weight > self.max_queue_size:
            raise APIError(400, f"Request needs {weight} engine slots but the queue holds at most "
                                f"{self.max_queue_size}", code="request_too_large")
        if self.num_in_flight + weight > self.max_queue_size:
            self.num_rejected["queue_full"] += 1
            raise APIError(429, f"Server is busy: {self.num_in_flight} requests in flight "
                                f"(limit {self.max_queue_size}); retry later",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})

    def acquire(self, weight: int = 1) -> None:
        """Admit `weight` engine requests or raise 429/503 (pair with `release`)."""
        self.check(weight)
        self.num_in_flight += weight
        self._idle.clear()

    def release(self, weight: int = 1) -> None:
        """Give back what `acquire` took."""
        self.num_in_flight -= weight
        if self.num_in_flight <= 0:
            self.num_in_flight = 0
            self._idle.set()

    @contextmanager
    def admit(self, weight: int = 1) -> Iterator[None]:
        """`with admission.admit(n): ...` holds n slots for the block."""
        self.acquire(weight)
        try:
            yield
        finally:
            self.release(weight)

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until nothing is in flight; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
