"""A keyed work queue: coalesces bursts of requests, never runs one key twice at once, retries with backoff.

Both of the operator's jobs go through one: reconciling a service's children and writing its status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable

logger = logging.getLogger(__name__)

OnError = Callable[[Hashable, Exception, int], None]


class WorkQueue:
    """`request(key)` runs `action(key)` once after `delay` seconds, however often it is requested meanwhile.

    Runs for one key never overlap (an older computation finishing last would undo a newer one); a
    request that arrives while the action runs schedules one more run afterwards, so the last event is
    never lost. A failing action is retried after `retry_delay`, doubling up to `max_retry_delay`;
    `on_error(key, exc, failures)` is told about every failure.
    """

    def __init__(self, action: Callable[[Hashable], Awaitable[None]], *, name: str, delay: float = 0.2,
                 retry_delay: float = 1.0, max_retry_delay: float = 60.0, on_error: OnError | None = None) -> None:
        self._action = action
        self._name = name
        self._delay = delay
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._on_error = on_error
        self._pending: dict[Hashable, tuple[asyncio.Task[None], float]] = {}
        self._running: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._failures: dict[Hashable, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self, key: Hashable, delay: float | None = None) -> None:
        """Run `action(key)` after `delay` (default: the queue's); an earlier request wins over a later one."""
        delay = self._delay if delay is None else delay
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if key in self._running:
            self._dirty.add(key)
            return
        if key in self._pending:
            task, pending_due = self._pending[key]
            if pending_due <= due:
                return
            task.cancel()  # e.g. a new spec should not wait out the retry backoff of the old one
        task = asyncio.create_task(self._run(key, delay))
        self._pending[key] = (task, due)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: Hashable, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        self._pending.pop(key, None)
        self._running.add(key)
        again: float | None = None
        try:
            await self._action(key)
            self._failures.pop(key, None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported and retried; one key must not stop the rest
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            again = min(self._retry_delay * 2 ** (failures - 1), self._max_retry_delay)
            logger.warning("%s of %s failed (%s); retry #%d in %.0fs", self._name, key, exc, failures, again)
            if self._on_error is not None:
                self._on_error(key, exc, failures)
        finally:
            self._running.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            again = self._delay if again is None else again
        if again is not None:
            self.request(key, again)

    def forget(self, key: Hashable) -> None:
        """Drop the failure count of a key that no longer exists."""
        self._failures.pop(key, None)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    @property
    def num_busy(self) -> int:
        return len(self._pending) + len(self._running)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
