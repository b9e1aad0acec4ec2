"""Ranks 1..N-1: a process (started by rank_process.py) that loads its shard and follows rank 0's steps.

    hello --> join the group --> load shard --> loaded --> loop: recv step (header + inputs) | forward
                                                             (INIT_KV_CACHE, EXECUTE, SHUTDOWN)

The loop waits for headers on its pipe (no collective is pending while the engine is idle, so no
timeout can fire); it never samples, and it takes no decision that changes its collectives: the
graphs it captures (INIT_KV_CACHE's GraphPlan) and the graph each step replays are rank 0's. Any
error is sent to rank 0 as text and ends the process with exit code 1; the parent-watch thread ends
it when the engine process is gone. On SHUTDOWN it releases its CUDA graphs before it leaves the
group (NCCL waits for them), and gives up waiting for the group after a bound.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection

import torch

from infergrid.worker.config import EngineConfig
from infergrid.worker.model_config import ModelConfig

logger = logging.getLogger(__name__)

_PARENT_POLL_S = 0.2
_LEAVE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class WorkerArgs:
    """What a follower rank needs to start (the first message rank 0 sends it)."""

    rank: int
    world_size: int
    backend: str
    store_port: int
    parent_pid: int
    num_threads: int
    config: EngineConfig
    model_dir: str
    model_config: ModelConfig
    max_model_len: int
    eos_token_ids: list[int]
    is_tp_debug: bool = False  # INFERGRID_TP_DEBUG as rank 0 read it


def _exit_when_parent_dies(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_worker(args: WorkerArgs, conn: Connection) -> None:
    """Process entry point of rank `args.rank` (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where is this rank?
    _exit_when_parent_dies(args.parent_pid)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s tp-rank{args.rank} %(name)s: %(message)s")
    try:
        torch.set_num_threads(args.num_threads)
        conn.send(("hello", os.getpid()))
        _follow(args, conn)
    except BaseException:  # noqa: BLE001 - reported to rank 0, then the process ends
        text = traceback.format_exc()
        logger.error("tensor-parallel rank %d failed:\n%s", args.rank, text)
        try:
            conn.send(("error", text))
        except OSError:
            pass
        os._exit(1)
    os._exit(0)  # NOTE: skips atexit hooks that could block on a half-torn-down process group


def _follow(args: WorkerArgs, conn: Connection) -> None:
    import torch.distributed as dist

    from infergrid.worker.distributed import messages
    from infergrid.worker.distributed.communication import tensor_parallel_barrier
    from infergrid.worker.distributed.messages import Command, GraphPlan, StepHeader
    from infergrid.worker.distributed.parallel_state import destroy_tensor_parallel, init_tensor_parallel
    from infergrid.worker.runner.model_runner import ModelRunner, resolve_device

    store = dist.TCPStore("127.0.0.1", args.store_port, args.world_size, False, timeout=timedelta(seconds=300))
    device = resolve_device(args.config.device, args.rank)
    init_tensor_parallel(args.rank, args.world_size, args.backend, store, timeout=timedelta(minutes=30),
                         device=device, debug_collectives=args.is_tp_debug)
    tensor_parallel_barrier(device)
    runner = ModelRunner(args.config, args.model_dir, args.model_config, args.max_model_len, args.eos_token_ids,
                         rank=args.rank)
    conn.send(("loaded", None))
    with torch.inference_mode():
        while True:
            try:
                data = conn.recv_bytes()
                command, payload = messages.unpack(data)
            except EOFError:  # rank 0 closed the pipe without a SHUTDOWN
                break
            if command is Command.SHUTDOWN:
                break
            if command is Command.INIT_KV_CACHE:
                assert isinstance(payload, GraphPlan)
                runner.initialize_kv_cache(payload)
            elif command is Command.EXECUTE:
                assert isinstance(payload, StepHeader)
                runner.follow_step(payload, messages.step_inputs(data))
    runner.release_cuda_graphs()  # before the group: NCCL will not destroy a communicator graphs still use
    # Together with rank 0 (which sent SHUTDOWN and leaves now too); rank 0 kills this process if it hangs.
    errors: list[BaseException] = []

    def leave_group() -> None:
        try:
            destroy_tensor_parallel()
        except BaseException as exc:  # noqa: BLE001 - raised below, in this rank's main thread
            errors.append(exc)

    leave = threading.Thread(target=leave_group, name="leave", daemon=True)
    leave.start()
    leave.join(_LEAVE_TIMEOUT_S)
    if leave.is_alive():
        logger.error("tensor-parallel rank %d: leaving the group did not finish within %.0f s",
                     args.rank, _LEAVE_TIMEOUT_S)
    if errors:
        raise errors[0]


def main() -> None:
    """`python -m infergrid.worker.distributed.worker_proc FD`: FD is this rank's end of the socket pair
    to rank 0, whose first message is the WorkerArgs."""
    conn = Connection(int(sys.argv[1]))
    try:
        args = conn.recv()
    except (EOFError, OSError):  # rank 0 went away before sending them
        os._exit(1)
    run_worker(args, conn)


if __name__ == "__main__":
    main()
