"""Starting follower ranks 1..N-1 through an explicit entry point:
`python -m infergrid.worker.distributed.worker_proc FD`, talking to rank 0 over a socket pair.

multiprocessing's spawn would re-import the caller's `__main__` in every rank, so a plain script that
builds an `LLM(..., tensor_parallel_size=2)` without an `if __name__ == "__main__":` guard would start
its engine again in each rank. Here a rank imports only the worker package; it gets its `WorkerArgs`
as the first message on the socket (the same framing as multiprocessing's pipes).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from multiprocessing.connection import Connection

from infergrid.worker.distributed.worker_proc import WorkerArgs


class RankProcess:
    """A follower rank's process, with what the executor needs of it: pid, liveness, exit code and a
    sentinel (a pidfd, readable once the process has exited) for `multiprocessing.connection.wait`."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.sentinel = os.pidfd_open(popen.pid)

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    @property
    def exitcode(self) -> int | None:
        """None while running; negative: killed by that signal."""
        return self._popen.poll()

    def close(self) -> None:
        """Release the sentinel (after the process has been waited for)."""
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


def start_rank(args: WorkerArgs) -> tuple[RankProcess, Connection]:
    """Start rank `args.rank` and hand it its arguments; returns its process and rank 0's end of the pipe."""
    ours, theirs = socket.socketpair()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # what this process imports
    try:
        popen = subprocess.Popen(
            [sys.executable, "-m", "infergrid.worker.distributed.worker_proc", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
    finally:
        theirs.close()
    conn = Connection(ours.detach())
    process = RankProcess(popen)
    try:
        conn.send(args)
    except OSError:  # it died at once; the executor's hello wait reports how
        pass
    return process, conn
