"""Requests held while no worker is ready (scale from zero, all ejected): a bounded FIFO with a deadline.

`wait()` returns once a worker is ready, or raises `HoldRejected` at once when the queue is full, or
when the hold timeout passes. The held count is the `infergrid:router_held_requests` gauge the
autoscaler reads to wake a service from zero.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class HoldRejected(Exception):
    """The request cannot be held: `reason` is "full" or "timeout"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HoldingQueue:
    def __init__(self, max_held: int, timeout: float, on_change: Callable[[int], None] | None = None) -> None:
        self.max_held = max_held
        self.timeout = timeout
        self._waiters: list[asyncio.Future[None]] = []
        self._on_change = on_change

    @property
    def num_held(self) -> int:
        return len(self._waiters)

    async def wait(self) -> None:
        """Hold until `release_all()`; HoldRejected("full") at once, HoldRejected("timeout") at the deadline."""
        if len(self._waiters) >= self.max_held:
            raise HoldRejected("full")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._changed()
        try:
            await asyncio.wait_for(waiter, self.timeout)
        except TimeoutError:
            raise HoldRejected("timeout") from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                self._changed()

    def release_all(self) -> None:
        """A worker became ready: wake every held request (in arrival order)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if waiters:
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(len(self._waiters))
