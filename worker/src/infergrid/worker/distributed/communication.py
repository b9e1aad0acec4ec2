"""The collectives of tensor parallelism; each is a no-op (or identity) on a single rank.

Every collective goes through here, so that the debug guard (debug.py) sees the sequence each rank
issues, and so that a CPU tensor never reaches NCCL (which needs CUDA tensors).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from infergrid.worker.distributed import debug
from infergrid.worker.distributed.parallel_state import get_tp_backend, get_tp_rank, get_tp_size


def _issue(op: str, x: torch.Tensor) -> None:
    if get_tp_backend() == "nccl" and not x.is_cuda:
        raise ValueError(f"tensor-parallel {op} of a {x.device} tensor over NCCL (NCCL needs CUDA tensors)")
    debug.record(op, x)


def tensor_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place; returns it."""
    if get_tp_size() > 1:
        _issue("all_reduce", x)
        dist.all_reduce(x)
    return x


def tensor_parallel_gather(x: torch.Tensor, dim: int = -1, dst: int = 0) -> torch.Tensor | None:
    """Concatenate every rank's `x` along `dim` on rank `dst` (in rank order); None on the other ranks."""
    size = get_tp_size()
    if size == 1:
        return x
    x = x.contiguous()
    _issue("gather", x)
    parts = [torch.empty_like(x) for _ in range(size)] if get_tp_rank() == dst else None
    dist.gather(x, parts, dst=dst)
    return None if parts is None else torch.cat(parts, dim=dim)


def tensor_parallel_min(value: int, device: torch.device) -> int:
    """The smallest `value` over the ranks (e.g. the KV blocks that fit on every GPU)."""
    if get_tp_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    _issue("all_reduce_min", t)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def tensor_parallel_barrier(device: torch.device) -> None:
    """Every rank gets here before any goes on, with all of its earlier device work finished: an
    eager all-reduce on `device` (it also creates NCCL's communicator and connections outside any
    CUDA-graph capture) followed by a device synchronize."""
    if get_tp_size() == 1:
        return
    t = torch.ones(1, device=device)
    _issue("barrier", t)
    dist.all_reduce(t)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_parallel_broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s `x` on every rank, in place (the other ranks pass a buffer of the same shape)."""
    if get_tp_size() > 1:
        _issue("broadcast", x)
        dist.broadcast(x, src=src)
    return x
