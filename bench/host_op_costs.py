"""Host time of the small launches a decode step is made of, on this machine: one tiny torch op, a
pinned upload, the torch ops vs the one Triton kernel that stage a step into a CUDA graph's buffers
(runner/graph_inputs.py), and the torch ops vs the kernel that cut a verification's rejected rows
(sample/rejection_sampler.keep_accepted_prefix). Baseline and candidates in the same run.

    PYTHONPATH=worker/src python bench/host_op_costs.py                  # GPU
    .venv/bin/python bench/host_op_costs.py --calls 5                    # CPU smoke (torch ops only)

Prints a table of microseconds of host time per call (median of 5 rounds of --calls calls each, the
device drained between rounds so that no call waits for a full launch queue). Without CUDA the
Triton rows are skipped (the kernels need a GPU) and the torch ops run on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from infergrid.worker.runner import graph_inputs
from infergrid.worker.runner.graph_inputs import GraphInputs
from infergrid.worker.runner.host_staging import PinnedStaging
from infergrid.worker.sample import rejection_sampler as rs


def _drain() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_us(fn: Callable[[], object], calls: int) -> float:
    rounds = []
    for _ in range(5):
        _drain()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    _drain()
    return statistics.median(rounds)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--batch", type=int, default=1, help="sequences in the staged step")
    args = p.parse_args()
    on_gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if on_gpu else "cpu")
    n, q, width = args.batch, 5, 20
    t = n * q
    dst = GraphInputs(*(torch.zeros(512 * q, dtype=torch.int64, device=dev) for _ in range(3)),
                      torch.zeros(512, dtype=torch.int32, device=dev),
                      torch.zeros(512, 64, dtype=torch.int32, device=dev),
                      torch.zeros(513, dtype=torch.int32, device=dev))
    flat = torch.arange(3 * t + (n + 1) + n + n * width, device=dev)
    ids, pos, slots = flat[:t], flat[t:2 * t], flat[2 * t:3 * t]
    qsl = flat[3 * t:3 * t + n + 1]
    seq_lens = flat[3 * t + n + 1:3 * t + 2 * n + 1]
    tables = flat[3 * t + 2 * n + 1:].view(n, width)
    stage_args = (ids, pos, slots, seq_lens, tables, qsl, t + 3, n, 0, 0, False)
    tiny = torch.zeros(4, device=dev)
    host = torch.arange(64)
    sampled = torch.randint(0, 4, (t,), device=dev)
    drafts = torch.randint(0, 4, (t,), device=dev)
    starts = torch.arange(t, device=dev) // q * q
    rows = [
        ("one tiny torch op (add_)", lambda: tiny.add_(1)),
        ("stage a step: torch ops", lambda: graph_inputs._stage_torch(dst, *stage_args)),
        ("cut rejected rows: torch ops", lambda: rs._keep_accepted_prefix_torch(sampled, drafts, starts, q, None, None)),
    ]
    if on_gpu:
        staging = PinnedStaging(dev)
        rows += [
            ("pinned upload of 64 int64 (PinnedStaging)", lambda: staging.to_device(host)),
            ("stage a step: one Triton kernel", lambda: graph_inputs._stage_triton(dst, *stage_args)),
            ("cut rejected rows: Triton kernel",
             lambda: rs._keep_accepted_prefix_triton(sampled, drafts, starts, q, None, None)),
        ]
    for _, fn in rows:  # compile / warm
        fn()
    device = torch.cuda.get_device_name() if on_gpu else "CPU (torch ops only)"
    print(f"host time per call, {device}, batch {n} x {q} tokens")
    print("| call | host us |")
    print("|---|---|")
    for name, fn in rows:
        print(f"| {name} | {host_us(fn, args.calls):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
