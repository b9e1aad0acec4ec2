"""The one-shot symmetric-memory all-reduce (distributed/symm_mem_all_reduce.py) on 2 GPUs: it
turns on, and its sums equal NCCL's for every size it takes, eagerly and replayed from a CUDA graph
many times in a row (the two alternating buffers must not race). Needs 2 GPUs."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]

SIZES = [1, 7, 4096, 8 * 4096, 32 * 4096, 64 * 4096]  # elements; the last two fill the 512 KiB buffer


def _rank_main(rank: int, store_path: str, errors: mp.Queue) -> None:
    try:
        import torch.distributed as dist

        from infergrid.worker.distributed import communication as comm
        from infergrid.worker.distributed.parallel_state import destroy_tensor_parallel, init_tensor_parallel
        from infergrid.worker.distributed.symm_mem_all_reduce import (
            get_symm_mem_all_reduce,
            init_symm_mem_all_reduce,
        )

        device = torch.device("cuda", rank)
        init_tensor_parallel(rank, 2, "nccl", dist.FileStore(store_path, 2), device=device)
        assert init_symm_mem_all_reduce(torch.bfloat16, device), "one-shot all-reduce did not turn on"
        one_shot = get_symm_mem_all_reduce()
        gen = torch.Generator(device=device).manual_seed(1234 + rank)
        for n in SIZES:
            x = torch.randn(n, device=device, generator=gen).to(torch.bfloat16)
            expected = x.clone()
            dist.all_reduce(expected)
            assert one_shot.can_reduce(x)
            got = comm.tensor_parallel_all_reduce(x.clone())
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        # Graph: 8 dependent all-reduces per replay (each input depends on the last output).
        n = 4096
        static_in = torch.zeros(n, dtype=torch.bfloat16, device=device)
        static_out = torch.zeros_like(static_in)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = static_in
            for _ in range(8):
                y = comm.tensor_parallel_all_reduce(y * 0.5)
            static_out.copy_(y)
        for step in range(200):
            static_in.copy_(torch.full((n,), float(step % 7 + rank), device=device))
            graph.replay()
            # each all-reduce: 0.5 * (a_0 + a_1); the ranks' inputs sum to 2 * (step % 7) + 1
            expected = (2 * (step % 7) + 1) * 0.5  # after the first all-reduce both ranks hold this
            assert torch.all(static_out == expected), f"replay {step}: {static_out[:4]} != {expected}"
        del graph
        destroy_tensor_parallel()
    except BaseException:  # noqa: BLE001 - reported to the test
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        os._exit(1)


def test_one_shot_all_reduce_matches_nccl_eager_and_in_cuda_graphs(tmp_path):
    assert torch.cuda.device_count() >= 2, "needs 2 CUDA devices"
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, str(tmp_path / "store"), errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(150)
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        p.kill()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not alive, f"ranks {alive} hung"
    assert not messages, "\n".join(messages)
    assert [p.exitcode for p in procs] == [0, 0]
