"""Load -> warm up -> ready -> (SIGTERM) drain -> exit, plus the stall watchdog behind /health.

    loading --(model loaded, 1-token probe ok)--> ready --(SIGTERM)--> draining --> stopped
       \\--(load or probe failed)--> failed (exit 1)     \\--(engine dead, e.g. a TP rank died)--> failed (exit 1)

NOTE: uvicorn's own SIGTERM handling closes the listening socket at once (new clients would see
"connection refused", not 503) and re-raises the signal after shutdown (exit code -15).
`DrainingServer` keeps the socket open while draining, answers 503 to new requests, waits for the
in-flight ones up to the drain timeout and then shuts down with exit code 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn

from .admission import AdmissionController

logger = logging.getLogger(__name__)

WARMUP_PROMPT = "Hello"
# After the drain timeout aborts what is left, how long the aborted responses get to go out.
ABORT_GRACE_S = 2.0


@dataclass
class StallDetector:
    """Flags an engine loop that stopped stepping while requests are queued or running.

    Fed with (unfinished requests, steps so far, now); pure so it is unit-testable.
    """

    stall_timeout_s: float
    _last_steps: int = -1
    _last_progress: float = 0.0
    is_stalled: bool = False

    def update(self, num_unfinished: int, num_steps_total: int, now: float) -> bool:
        """Record one observation; returns True while stalled."""
        if num_steps_total != self._last_steps or num_unfinished == 0:
            self._last_steps = num_steps_total
            self._last_progress = now
            self.is_stalled = False
        else:
            self.is_stalled = now - self._last_progress >= self.stall_timeout_s
        return self.is_stalled


class Lifecycle:
    """Owns the engine's life: background load, warm-up probe, health, readiness and drain."""

    def __init__(self, engine_factory: Callable[[], Any], admission: AdmissionController,
                 stall_timeout_s: float = 30.0, watchdog_interval_s: float = 1.0) -> None:
        self._engine_factory = engine_factory
        self.admission = admission
        self.engine: Any | None = None
        self.state = "loading"
        self.error: str | None = None
        self.started_at = time.time()
        self.detector = StallDetector(stall_timeout_s)
        self._watchdog_interval_s = watchdog_interval_s
        self._tasks: list[asyncio.Task[None]] = []
        self.on_fatal: Callable[[], None] | None = None

    # ------------------------------------------------------------------------------------- state
    @property
    def is_draining(self) -> bool:
        return self.state in ("draining", "stopped")

    def is_healthy(self) -> bool:
        """Liveness: not failed, and (once loaded) the engine loop is alive and not stalled."""
        if self.state == "failed":
            return False
        if self.engine is None:
            return True  # still loading: alive
        try:
            alive = bool(self.engine.is_healthy())
        except Exception:  # noqa: BLE001 - a broken engine is simply unhealthy
            alive = False
        return alive and not self.detector.is_stalled

    def is_ready(self) -> bool:
        """Readiness: warmed up, accepting requests, healthy."""
        return self.state == "ready" and self.is_healthy()

    def max_model_len(self) -> int:
        """The engine's effective context length (prompt + output)."""
        return int(self.engine.max_model_len)

    def stats(self) -> Any | None:
        """engine.stats() or None before the engine exists."""
        if self.engine is None:
            return None
        try:
            return self.engine.stats()
        except Exception:  # noqa: BLE001
            return None

    # ------------------------------------------------------------------------------------ phases
    async def start(self) -> None:
        """Begin loading in the background (the HTTP port is already answering /health)."""
        self._tasks.append(asyncio.create_task(self._load(), name="engine-load"))

    async def _load(self) -> None:
        try:
            engine = await asyncio.to_thread(self._engine_factory)
            self.engine = engine
            await engine.start()
            await self._warm_up(engine)
        except Exception as exc:  # noqa: BLE001
            logger.exception("engine failed to load or warm up")
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            if self.on_fatal is not None:
                self.on_fatal()
            return
        if self.state == "loading":
            self.state = "ready"
            self.admission.open()
            logger.info("model ready")
        self._tasks.append(asyncio.create_task(self._watchdog(), name="engine-watchdog"))

    async def _warm_up(self, engine: Any) -> None:
        """Run a 1-token greedy generation; readiness requires it to finish."""
        from infergrid.worker.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        last = None
        async for out in engine.generate(WARMUP_PROMPT, params, f"warmup-{uuid.uuid4().hex}"):
            last = out
        if last is None or not last.finished or not last.outputs or len(last.outputs[0].token_ids) != 1:
            raise RuntimeError(f"warm-up generation did not produce exactly one token: {last!r}")

    async def _watchdog(self) -> None:
        while self.state in ("ready", "draining"):
            dead = getattr(self.engine, "dead_error", None)
            if dead is not None:  # never coming back (unlike a stall): fail /health and exit
                logger.error("engine is dead: %s; exiting", dead)
                self.state, self.error = "failed", f"engine dead: {dead}"
                self.admission.close("not_ready")
                if self.on_fatal is not None:
                    self.on_fatal()
                return
            stats = self.stats()
            if stats is not None:
                stalled = self.detector.update(stats.num_running + stats.num_waiting, stats.num_steps_total,
                                               time.monotonic())
                if stalled:
                    logger.error("engine loop made no progress for %.1fs with %d unfinished requests",
                                 self.detector.stall_timeout_s, stats.num_running + stats.num_waiting)
            await asyncio.sleep(self._watchdog_interval_s)

    def begin_drain(self) -> None:
        """Stop admitting (503) and fail readiness; in-flight requests continue."""
        if self.state != "failed":
            self.state = "draining"
        self.admission.close("draining")

    async def drain(self, timeout_s: float) -> bool:
        """begin_drain, then wait for in-flight requests; False if the timeout cut them off."""
        self.begin_drain()
        is_clean = await self.admission.wait_idle(timeout_s)
        if not is_clean:
            logger.warning("drain timeout (%.1fs) hit with %d requests in flight; aborting them", timeout_s,
                           self.admission.num_in_flight)
            if self.engine is not None:
                # Ends every remaining request with finish_reason "abort": streams get a last chunk
                # and [DONE], plain requests a 503; then give the responses a moment to go out.
                await self.engine.shutdown(0.0)
                await self.admission.wait_idle(ABORT_GRACE_S)
        return is_clean

    async def stop(self) -> None:
        """Stop background tasks and shut the engine down (aborting whatever is left)."""
        self.state = "stopped" if self.state != "failed" else "failed"
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.engine is not None:
            try:
                await self.engine.shutdown(0.0)
            except Exception:  # noqa: BLE001
                logger.exception("engine shutdown failed")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of closing the socket at once.

    A second signal skips the rest of the drain; a third forces exit.
    """

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_timeout_s = drain_timeout_s
        self.exit_code = 0
        self._is_drain_requested = False
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        lifecycle.on_fatal = self._fatal

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def _fatal(self) -> None:
        self.exit_code = 1
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:  # noqa: ARG002
        # NOTE: not appended to _captured_signals, so uvicorn does not re-raise it after shutdown.
        if not self._is_drain_requested and self._loop is not None and not self.should_exit:
            logger.info("received %s: draining (up to %.1fs)", signal.Signals(sig).name, self.drain_timeout_s)
            self._is_drain_requested = True
            self._loop.call_soon_threadsafe(self._start_drain)
        elif not self.should_exit:
            logger.info("second signal: stopping without waiting for the drain")
            self.should_exit = True
        else:
            self.force_exit = True

    def _start_drain(self) -> None:
        self._drain_task = asyncio.create_task(self._drain_then_exit(), name="drain")

    async def _drain_then_exit(self) -> None:
        try:
            await self.lifecycle.drain(self.drain_timeout_s)
        finally:
            self.should_exit = True
