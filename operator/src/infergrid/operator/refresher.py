"""Coalesces bursts of watch events into at most one status computation per service per short window."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable

logger = logging.getLogger(__name__)


class Debouncer:
    """`request(key)` runs `action(key)` once after `delay` seconds, however often it is requested meanwhile.

    Runs for one key never overlap (an older computation finishing last would undo a newer one); a
    request that arrives while the action runs schedules one more run afterwards, so the last event is
    never lost. A failing action is retried after `retry_delay`.
    """

    def __init__(self, action: Callable[[Hashable], Awaitable[None]], *, delay: float = 0.2,
                 retry_delay: float = 2.0) -> None:
        self._action = action
        self._delay = delay
        self._retry_delay = retry_delay
        self._pending: set[Hashable] = set()
        self._running: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self, key: Hashable, delay: float | None = None) -> None:
        if key in self._pending:
            return
        if key in self._running:
            self._dirty.add(key)
            return
        self._pending.add(key)
        task = asyncio.create_task(self._run(key, self._delay if delay is None else delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: Hashable, delay: float) -> None:
        await asyncio.sleep(delay)
        self._pending.discard(key)
        self._running.add(key)
        again: float | None = None
        try:
            await self._action(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - logged and retried; one service must not stop the rest
            logger.warning("status refresh of %s failed (%s); retrying in %.0fs", key, exc, self._retry_delay)
            again = self._retry_delay
        finally:
            self._running.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            again = self._delay if again is None else again
        if again is not None:
            self.request(key, again)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
