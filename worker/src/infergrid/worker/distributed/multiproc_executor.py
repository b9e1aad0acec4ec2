"""MultiProcExecutor: tensor_parallel_size ranks, rank 0 in the engine process (see executor.py).

Rank 0 lives in the engine process (the scheduler's): it builds the step's inputs, sends each
follower the step (a fixed-size header and the flat int64 inputs), runs its shard of the model and
samples from the logits gathered to it. A monitor thread waits on the followers' process sentinels:
a rank that dies marks the executor failed (`check_health` raises, so AsyncLLM turns unhealthy),
the remaining ranks are killed so no collective stays blocked, and later steps raise.

Followers ignore SIGINT/SIGTERM (rank 0 decides when they stop), and exit on their own when the
engine process disappears (a parent-watch thread), so no rank outlives the worker.

Teardown order (NCCL >= 2.26 blocks forever in communicator destroy *and* abort while a CUDA graph
that captured one of its collectives is alive): every rank releases its CUDA graphs, then leaves the
group; each wait is bounded, and an abort runs in its own thread, never beside a pending destroy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from infergrid.worker import envs
from infergrid.worker.config import EngineConfig
from infergrid.worker.distributed import messages
from infergrid.worker.distributed.communication import tensor_parallel_barrier
from infergrid.worker.distributed.executor import Executor, RankDiedError
from infergrid.worker.distributed.messages import Command, StepHeader
from infergrid.worker.distributed.parallel_state import (
    abort_tensor_parallel,
    backend_for_device,
    destroy_tensor_parallel,
    init_tensor_parallel,
)
from infergrid.worker.distributed.rank_process import RankProcess, start_rank
from infergrid.worker.distributed.worker_proc import WorkerArgs
from infergrid.worker.engine.scheduler_output import SchedulerOutput
from infergrid.worker.model_config import ModelConfig
from infergrid.worker.runner.model_runner import ModelRunner, resolve_device
from infergrid.worker.runner.runner_output import ModelRunnerOutput, PendingRunnerOutput

logger = logging.getLogger(__name__)

# Ranks rendezvous within this long (they have only imported torch by then); collectives after that
# use the process group's timeout.
_RENDEZVOUS_TIMEOUT = timedelta(seconds=300)
_GROUP_TIMEOUT = timedelta(minutes=30)
_STOP_TIMEOUT_S = 5.0
_ABORT_TIMEOUT_S = 10.0
_HELLO_TIMEOUT_S = 300.0  # spawn + imports
_LOAD_TIMEOUT_S = 3600.0  # reading a shard of a large checkpoint from slow storage


class _Rank:
    """The engine's handle on one follower rank."""

    def __init__(self, rank: int, process: RankProcess, conn: multiprocessing.connection.Connection) -> None:
        self.rank, self.process, self.conn = rank, process, conn

    @property
    def pid(self) -> int:
        return int(self.process.pid)


def _kill_ranks(processes: list[RankProcess]) -> None:
    for proc in processes:
        if proc.is_alive():
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGKILL)
    for proc in processes:
        proc.join(_STOP_TIMEOUT_S)


class MultiProcExecutor(Executor):
    """tensor_parallel_size N > 1: rank 0 in this process, ranks 1..N-1 started as processes of their
    own (see module docstring).

    One per process at a time (the ranks form the default torch.distributed process group); after
    `shutdown` another can start."""

    def __init__(self, config: EngineConfig, model_dir: str, model_config: ModelConfig, max_model_len: int,
                 eos_token_ids: list[int]) -> None:
        self.world_size = config.tensor_parallel_size
        device = resolve_device(config.device)  # rank r uses the r-th device from here
        if device.type == "cuda" and torch.cuda.device_count() < device.index + self.world_size:
            raise ValueError(
                f"tensor_parallel_size {self.world_size} needs {self.world_size} GPUs (from {device} on), "
                f"but {torch.cuda.device_count()} are visible"
            )
        self.backend = backend_for_device(device)
        self._ranks: list[_Rank] = []
        self._failure: str | None = None
        self._is_stopping = False
        self._is_in_step = False
        self._abort_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        is_tp_debug = envs.tp_debug()  # decided here, for every rank (the guard's gloo group is collective)
        follower_config = dataclasses.replace(config, device=str(device))
        _prefer_loopback()
        self._store = store = dist.TCPStore("127.0.0.1", 0, self.world_size, True, timeout=_RENDEZVOUS_TIMEOUT,
                                            wait_for_workers=False)
        self._saved_num_threads = torch.get_num_threads()
        num_threads = max(1, self._saved_num_threads // self.world_size) if device.type == "cpu" else 4
        if device.type == "cpu":  # the ranks share this machine's cores; spinning threads would starve each other
            torch.set_num_threads(num_threads)
        try:
            for rank in range(1, self.world_size):
                args = WorkerArgs(rank=rank, world_size=self.world_size, backend=self.backend, store_port=store.port,
                                  parent_pid=os.getpid(), num_threads=num_threads, config=follower_config,
                                  model_dir=model_dir, model_config=model_config, max_model_len=max_model_len,
                                  eos_token_ids=list(eos_token_ids), is_tp_debug=is_tp_debug)
                proc, conn = start_rank(args)
                self._ranks.append(_Rank(rank, proc, conn))
            self._finalizer = weakref.finalize(self, _kill_ranks, [r.process for r in self._ranks])
            self._wait_for_all("hello", _HELLO_TIMEOUT_S)
            init_tensor_parallel(0, self.world_size, self.backend, store, timeout=_GROUP_TIMEOUT, device=device,
                                 debug_collectives=is_tp_debug)
            tensor_parallel_barrier(device)  # every rank joined (one that cannot fails here, before loading)
            self.driver_runner = ModelRunner(config, model_dir, model_config, max_model_len, eos_token_ids, rank=0)
            self._attach_spec_decoder(config)
            self._wait_for_all("loaded", _LOAD_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        self.driver_runner.step_broadcaster = self._broadcast_step
        self._monitor = threading.Thread(target=self._watch_ranks, name="infergrid-tp-monitor", daemon=True)
        self._monitor.start()
        logger.info("tensor parallel: %d ranks (%s); rank pids %s (rank 0 is this process)",
                    self.world_size, self.backend, self.rank_pids)

    # -- Executor ----------------------------------------------------------------------------------
    @property
    def rank_pids(self) -> list[int]:
        return [os.getpid(), *(r.pid for r in self._ranks)]

    def initialize_kv_cache(self) -> int:
        plan = self.driver_runner.graph_plan()  # every rank captures exactly these graphs
        self._send_all(messages.pack(Command.INIT_KV_CACHE, plan))
        return self._initialize_kv_cache(plan)

    def execute_model(self, scheduler_output: SchedulerOutput,
                      before_sample: Callable[[], None] | None = None) -> PendingRunnerOutput:
        self.check_health()
        pending = self._guarded(lambda: self.driver_runner.execute_model(scheduler_output, before_sample))
        return _GuardedOutput(pending, self._guarded)

    def _guarded(self, call: Callable[[], Any]) -> Any:
        """Run a call that waits on collectives (launching a step, waiting for its tokens); a rank
        that died meanwhile turns its failure into RankDiedError."""
        was_in_step, self._is_in_step = self._is_in_step, True  # (reentrant: before_sample waits in a step)
        try:
            output = call()
        except Exception as exc:
            if any(not r.process.is_alive() for r in self._ranks):
                self._monitor.join(2.0)  # a collective failed because a rank died: report which
            if self._failure is not None or self._is_stopping:
                self.driver_runner.release_cuda_graphs()  # the pending NCCL abort waits for them
            if self._failure is not None:
                raise RankDiedError(self._failure) from exc
            raise
        finally:
            self._is_in_step = was_in_step
        if self._failure is not None:  # a rank that died mid-step (aborted collectives) invalidates its tokens
            self.driver_runner.release_cuda_graphs()
            self.check_health()
        return output

    def check_health(self) -> None:
        if self._failure is not None:
            raise RankDiedError(self._failure)

    def shutdown(self) -> None:
        with self._lock:
            if self._is_stopping:
                return
            self._is_stopping = True
        runner = getattr(self, "driver_runner", None)  # (None when loading failed)
        if runner is not None and not self._is_in_step:  # a step stuck in a collective releases them itself
            runner.release_cuda_graphs()
        for r in self._ranks:
            with contextlib.suppress(OSError, ValueError):
                r.conn.send_bytes(messages.pack(Command.SHUTDOWN))
        leave = None
        if self._failure is None and not self._is_in_step:  # the followers leave the group now too
            leave = threading.Thread(target=_suppressed(destroy_tensor_parallel), name="infergrid-tp-leave",
                                     daemon=True)
            leave.start()
            leave.join(2 * _STOP_TIMEOUT_S)
        for r in self._ranks:
            r.process.join(_STOP_TIMEOUT_S)
        _kill_ranks([r.process for r in self._ranks])
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            monitor.join(_STOP_TIMEOUT_S)  # it waits on the sentinels closed below (woken by the exits)
        for r in self._ranks:
            r.conn.close()
            if not r.process.is_alive():
                r.process.close()
        if self.backend != "nccl":
            _suppressed(abort_tensor_parallel)()  # gloo: whatever is left after a failure
        elif leave is not None and leave.is_alive():
            # NOTE: an NCCL abort beside a destroy in progress blocks on the communicator; leave it be.
            logger.error("tensor parallel: leaving the process group did not finish within %.0f s",
                         2 * _STOP_TIMEOUT_S)
        else:
            self._start_abort()  # whatever is left after a failure or a stuck step (no-op after a clean leave)
            assert self._abort_thread is not None
            self._abort_thread.join(_ABORT_TIMEOUT_S)
            if self._abort_thread.is_alive():
                logger.error("tensor parallel: aborting NCCL did not finish within %.0f s", _ABORT_TIMEOUT_S)
        torch.set_num_threads(self._saved_num_threads)
        logger.info("tensor parallel: all %d ranks stopped", self.world_size)

    # -- internals ---------------------------------------------------------------------------------
    def _broadcast_step(self, header: StepHeader, inputs: np.ndarray) -> None:
        self._send_all(messages.pack(Command.EXECUTE, header, inputs))

    def _send_all(self, data: bytes) -> None:
        self.check_health()
        for r in self._ranks:
            try:
                r.conn.send_bytes(data)
            except OSError as exc:  # its pipe is closed: it died (the monitor thread will stop the others)
                failure = self._describe_death(r)
                with self._lock:
                    self._failure = self._failure or failure
                raise RankDiedError(self._failure) from exc

    def _wait_for_all(self, kind: str, timeout_s: float) -> None:
        """Receive message `kind` from every follower; raise if one reports an error, dies first or
        stays silent for `timeout_s`."""
        pending = {r.conn: r for r in self._ranks}
        sentinels = {r.process.sentinel: r for r in self._ranks}
        deadline = time.monotonic() + timeout_s
        while pending:
            ready_list = multiprocessing.connection.wait([*pending, *sentinels], max(0.0, deadline - time.monotonic()))
            if not ready_list:
                silent = ", ".join(str(r.rank) for r in pending.values())
                raise RankDiedError(f"tensor-parallel ranks {silent} sent no {kind!r} within {timeout_s:.0f}s")
            for ready in ready_list:
                r = pending.get(ready)  # type: ignore[call-overload]
                if r is None:  # a sentinel: that process exited
                    raise RankDiedError(self._describe_death(sentinels[ready]))  # type: ignore[index]
                try:
                    got, detail = r.conn.recv()
                except (EOFError, OSError):
                    raise RankDiedError(self._describe_death(r)) from None
                if got != kind:
                    raise RankDiedError(f"tensor-parallel rank {r.rank} (pid {r.pid}) failed while starting:\n{detail}")
                del pending[r.conn]

    def _describe_death(self, r: _Rank) -> str:
        r.process.join(1.0)
        detail = ""
        with contextlib.suppress(EOFError, OSError, ValueError):
            while r.conn.poll(0):
                kind, text = r.conn.recv()
                if kind == "error":
                    detail = f": {text.strip().splitlines()[-1]}"
        return f"tensor-parallel rank {r.rank} (pid {r.pid}) exited with code {r.process.exitcode}{detail}"

    def _watch_ranks(self) -> None:
        sentinels = {r.process.sentinel: r for r in self._ranks}
        ready = multiprocessing.connection.wait(list(sentinels))
        if self._is_stopping:
            return
        failure = self._describe_death(sentinels[ready[0]])  # type: ignore[index]
        with self._lock:
            self._failure = self._failure or failure  # (a failed send may have named it first)
        logger.error("%s; stopping the other ranks, the engine is dead", self._failure)
        _kill_ranks([r.process for r in self._ranks])  # gloo: rank 0's pending collective fails at once
        if self.backend == "nccl":  # NCCL waits for a dead peer forever unless its communicator is aborted
            self._start_abort()

    def _start_abort(self) -> None:
        """Abort the NCCL group in a thread of its own (once): it ends collectives blocked on a dead
        peer at once, but returns only after rank 0's CUDA graphs are released."""
        with self._lock:
            if self._abort_thread is None:
                self._abort_thread = threading.Thread(target=_suppressed(abort_tensor_parallel),
                                                      name="infergrid-tp-abort", daemon=True)
                self._abort_thread.start()


class _GuardedOutput(PendingRunnerOutput):
    """Rank 0's pending output, waited for under the executor's rank-failure guard."""

    def __init__(self, inner: PendingRunnerOutput, guard: Callable[[Callable[[], Any]], Any]) -> None:
        self._inner, self._guard = inner, guard

    def result(self) -> ModelRunnerOutput:
        return self._guard(self._inner.result)  # type: ignore[no-any-return]


def _suppressed(fn: Any) -> Any:
    def call() -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - teardown after a failure: log and go on
            logger.warning("tensor parallel: %s failed", fn.__name__, exc_info=True)

    return call


def _prefer_loopback() -> None:
    """All ranks are on this host: keep gloo's sockets on the loopback interface (NCCL talks over
    NVLink/PCIe and picks its bootstrap interface itself)."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
