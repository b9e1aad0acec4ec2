"""One-shot all-reduce through symmetric memory: the small all-reduces of decode, over NVLink.

A decode step all-reduces a [batch, hidden] activation twice per layer (64 times for an 8B model),
each a few KiB to a few hundred KiB: NCCL's ring is latency-bound there. With symmetric memory every
rank maps every other rank's buffer, so one kernel does the whole all-reduce: copy the input into
this rank's buffer, a barrier over signal pads, then each rank reads all ranks' buffers and sums
(PyTorch's `symm_mem::one_shot_all_reduce_out`). It is capturable in CUDA graphs.

Two buffers alternate. All-reduce i+2 reuses all-reduce i's buffer only after all-reduce i+1's
barrier, which every rank reaches only after finishing all-reduce i, so no rank overwrites a buffer
a peer still reads. Each forward pass does an even number of all-reduces of one size (two per
layer) and ends in the logits gather, so every forward (eager or a graph capture) starts on buffer 0.

Larger tensors (prefill), other dtypes, CPU (gloo) and setups where the ranks cannot map each
other's memory use NCCL (communication.py). INFERGRID_DISABLE_CUSTOM_ALL_REDUCE=1 turns this off.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from infergrid.worker import envs

logger = logging.getLogger(__name__)

MAX_BYTES = 512 * 1024  # above this NCCL's bandwidth wins (and prefill activations go to NCCL)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


class SymmMemAllReduce:
    """Two symmetric buffers of MAX_BYTES on this rank's GPU, rendezvoused with the whole group."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.dtype = dtype
        self.max_numel = MAX_BYTES // dtype.itemsize
        group = dist.group.WORLD
        assert group is not None
        self.group_name = group.group_name
        self.buffers = [symm_mem.empty(self.max_numel, dtype=dtype, device=device) for _ in range(2)]
        for buf in self.buffers:
            symm_mem.rendezvous(buf, group)
        self.next = 0

    def can_reduce(self, x: torch.Tensor) -> bool:
        return x.dtype == self.dtype and x.is_cuda and x.is_contiguous() and x.numel() <= self.max_numel

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (x must pass `can_reduce`)."""
        n = x.numel()
        buf = self.buffers[self.next][:n]
        self.next ^= 1
        buf.copy_(x.view(-1))
        torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", self.group_name, x.view(-1))
        return x


_INSTANCE: SymmMemAllReduce | None = None


def get_symm_mem_all_reduce() -> SymmMemAllReduce | None:
    return _INSTANCE


def _usable_here(dtype: torch.dtype, device: torch.device, world_size: int) -> str | None:
    """Why this rank cannot use it (None: it can)."""
    if envs.disable_custom_all_reduce():
        return "INFERGRID_DISABLE_CUSTOM_ALL_REDUCE is set"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} (supported: bfloat16, float32)"
    if device.type != "cuda" or dist.get_backend() != "nccl":
        return "not NCCL on CUDA"
    base = device.index - dist.get_rank()  # rank r runs on GPU base + r (model_runner.resolve_device)
    peers = [base + r for r in range(world_size) if base + r != device.index]
    if not all(torch.cuda.can_device_access_peer(device.index, p) for p in peers):
        return "the GPUs cannot access each other's memory (no P2P)"
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
    except ImportError as exc:
        return f"no symmetric memory in this PyTorch ({exc})"
    return None


def init_symm_mem_all_reduce(dtype: torch.dtype, device: torch.device) -> bool:
    """Collective (every rank, same order, outside CUDA-graph capture): set up the one-shot
    all-reduce when every rank can use it. Returns whether it is on."""
    global _INSTANCE
    from infergrid.worker.distributed.communication import tensor_parallel_min

    close_symm_mem_all_reduce()
    if device.type != "cuda":
        return False  # gloo: every rank is on CPU
    reason = _usable_here(dtype, device, dist.get_world_size())
    if tensor_parallel_min(0 if reason else 1, device) == 0:
        logger.info("all-reduce: NCCL only (%s)", reason or "another rank cannot use symmetric memory")
        return False
    try:
        _INSTANCE = SymmMemAllReduce(dtype, device)
    except Exception as exc:  # noqa: BLE001 - a driver or VM without the needed memory mapping: NCCL
        logger.warning("all-reduce: symmetric memory failed (%s); NCCL only", exc)
        reason = str(exc)
    if tensor_parallel_min(0 if reason else 1, device) == 0:
        _INSTANCE = None
        return False
    logger.info("all-reduce: one-shot symmetric memory up to %d KiB, NCCL above", MAX_BYTES // 1024)
    return True


def close_symm_mem_all_reduce() -> None:
    global _INSTANCE
    _INSTANCE = None
