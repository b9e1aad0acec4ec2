"""AsyncLLM: the engine behind an asyncio server.

The LLMEngine runs in one background thread (it is not thread-safe, so only that thread touches
it). asyncio callers talk to it through a command queue (add / abort, each answered through a
future) and receive outputs on per-request asyncio queues, fed with `loop.call_soon_threadsafe`:

    event loop                            engine thread
    generate() --add--> commands ------>  process commands
       ^                                  step(): schedule, run, update, outputs
       +---- queue.put_nowait <---------- call_soon_threadsafe(per-request queue)
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from infergrid.worker.config import EngineConfig
from infergrid.worker.engine.llm_engine import LLMEngine
from infergrid.worker.engine.stats import EngineStats
from infergrid.worker.outputs import RequestOutput
from infergrid.worker.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5
# How long shutdown() waits for an engine that is already dead (e.g. stuck in a collective with a
# tensor-parallel rank that died) before giving up on it.
_DEAD_ENGINE_WAIT_S = 5.0


class EngineDeadError(RuntimeError):
    """The engine loop died (its cause is chained); no request can make progress."""


class EngineShuttingDownError(RuntimeError):
    """generate() was called after shutdown() started."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLM:
    """Async facade over LLMEngine (see the module docstring).

    Args:
        config: the engine configuration; the model is loaded in the constructor.
        stall_timeout_s: `is_healthy()` turns False when requests are pending and no step has made
            progress for this long.
    """

    def __init__(self, config: EngineConfig, stall_timeout_s: float = 60.0) -> None:
        self.engine = LLMEngine(config)
        self.config = config
        self.tokenizer = self.engine.tokenizer
        self.grammar_compiler = self.engine.grammar_compiler  # thread-safe: the server compiles off the loop
        self.model_config = self.engine.model_config
        self.max_model_len = self.engine.max_model_len
        self.stall_timeout_s = stall_timeout_s
        self._commands: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._accepting = True
        self._error: BaseException | None = None
        self._stats = self.engine.get_stats()
        self._num_unfinished = 0
        self._last_progress = time.monotonic()

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine thread (idempotent)."""
        self._ensure_started()

    def _ensure_started(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_loop, name="infergrid-engine", daemon=True)
            self._thread.start()

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop admitting requests, let running ones finish for up to `drain_timeout` seconds (None:
        no limit), end the rest with finish_reason "abort", then stop the engine thread."""
        self._accepting = False
        if self._thread is None:
            await asyncio.to_thread(self.engine.shutdown)
            return
        deadline = None if drain_timeout is None else time.monotonic() + drain_timeout
        while self._num_unfinished > 0 and self._error is None and self._thread.is_alive():
            if deadline is not None and time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        wait_s = _DEAD_ENGINE_WAIT_S if self.errored else None
        if self._thread.is_alive():
            try:
                await asyncio.wait_for(self._call(self._abort_all), wait_s)
            except (EngineDeadError, TimeoutError):
                pass
        self._stop.set()
        self._wakeup.set()
        await asyncio.to_thread(self._thread.join, wait_s)
        if self._thread.is_alive():
            logger.error("engine loop did not stop within %.1fs; abandoning it", wait_s)
            self._fail_everything(EngineDeadError("the engine is dead"))
        await asyncio.to_thread(self.engine.shutdown)

    # -- requests ----------------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
        deadline: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs (cumulative, with deltas) until the request finishes.

        `deadline` is absolute time.monotonic() seconds. Raises ValueError at once when the request
        can never run. Leaving the loop early or cancelling the consumer aborts the request."""
        if not self._accepting:
            raise EngineShuttingDownError("the engine is shutting down")
        self._ensure_started()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._streams[request_id] = stream
        finished = False
        try:
            await self._call(lambda: self.engine.add_request(request_id, prompt, params, priority, deadline))
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._submit(lambda: self.engine.abort_request(request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request (unknown or finished ids are ignored); its KV blocks are free on return.
        A consumer still iterating generate() receives a final output with finish_reason "abort"."""
        await self._call(lambda: self._abort_and_notify(request_id))

    # -- introspection -----------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """The snapshot taken after the engine's latest step."""
        return self._stats

    @property
    def dead_error(self) -> BaseException | None:
        """Why the engine can never make progress again (its loop died, or a tensor-parallel rank
        died), else None."""
        if self._error is not None:
            return self._error
        try:
            self.engine.check_health()
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return exc
        return None

    @property
    def errored(self) -> bool:
        """True once the engine is dead for good (see `dead_error`); a stall is not an error."""
        return self.dead_error is not None

    @property
    def rank_pids(self) -> list[int]:
        """Process id of every tensor-parallel rank, rank 0 (this process) first."""
        return self.engine.model_executor.rank_pids

    def is_healthy(self) -> bool:
        """Loop thread alive (once started), no engine error, and progress while requests wait."""
        if self.errored:
            return False
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return False
        stalled = self._num_unfinished > 0 and time.monotonic() - self._last_progress > self.stall_timeout_s
        return not stalled

    # -- commands ----------------------------------------------------------------------------------
    def _submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._error is not None or self._stop.is_set():
            future.set_exception(EngineDeadError("the engine loop is not running"))
            return future
        self._commands.append((fn, future))
        self._wakeup.set()
        if self._error is not None or self._stop.is_set():  # the loop may have exited meanwhile
            self._drain_commands(EngineDeadError("the engine loop is not running"))
        return future

    async def _call(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self._submit(fn))

    def _run_commands(self) -> None:
        while self._commands:
            try:
                fn, future = self._commands.popleft()
            except IndexError:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)
                continue
            self._stats = self.engine.get_stats()  # callers see e.g. an abort's freed blocks at once
            self._num_unfinished = len(self.engine.output_processor.parents)
            future.set_result(result)

    def _drain_commands(self, error: BaseException) -> None:
        while self._commands:
            try:
                _, future = self._commands.popleft()
            except IndexError:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _abort_and_notify(self, request_id: str) -> None:
        for final in self.engine.abort_request(request_id):
            self._deliver(final)

    def _abort_all(self) -> None:
        for request_id in list(self.engine.output_processor.parents):
            self._abort_and_notify(request_id)

    # -- the engine thread -------------------------------------------------------------------------
    def _run_loop(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                self._wakeup.clear()
                self._run_commands()
                self._num_unfinished = len(engine.output_processor.parents)
                if not engine.has_unfinished_requests():
                    self._stats = engine.get_stats()
                    self._last_progress = time.monotonic()
                    self._wakeup.wait(_IDLE_WAIT_S)
                    continue
                outputs = engine.step()
                self._stats = engine.get_stats()
                if outputs or engine.scheduler.running:
                    self._last_progress = time.monotonic()
                for out in outputs:
                    self._deliver(out)
                self._num_unfinished = len(engine.output_processor.parents)
                if not outputs and not engine.scheduler.running:
                    time.sleep(0.001)  # nothing could be scheduled: do not spin
        except BaseException as exc:  # noqa: BLE001 - reported to every waiting consumer
            logger.exception("engine loop died")
            self._error = exc
            self._fail_everything(EngineDeadError(f"engine loop died: {exc!r}"))
        self._drain_commands(EngineDeadError("the engine loop has stopped"))

    def _deliver(self, item: RequestOutput | BaseException, request_id: str | None = None) -> None:
        key = request_id if request_id is not None else item.request_id  # type: ignore[union-attr]
        with self._streams_lock:
            stream = self._streams.get(key)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed
                pass

    def _fail_everything(self, error: EngineDeadError) -> None:
        with self._streams_lock:
            ids = list(self._streams)
        for request_id in ids:
            self._deliver(error, request_id)
        self._drain_commands(error)
