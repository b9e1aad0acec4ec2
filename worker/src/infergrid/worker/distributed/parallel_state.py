"""This process's place in the tensor-parallel group, and whether a TP size fits a model.

One process per rank, one rank per GPU (NCCL) or per CPU process (gloo). Rank 0 is the engine
process: it runs the scheduler, sends each step's inputs to the others and samples. Ranks 1..N-1 are
processes the engine spawns (see worker_proc.py). All ranks form the default process group.

Sharding (Megatron): q/k/v and gate/up split by output (heads / intermediate columns), o and down by
input (partial sums all-reduced), embedding and LM head by vocabulary rows. KV heads are split when
there are at least as many as ranks, else each is replicated on `tp_size // num_kv_heads` ranks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from infergrid.worker.distributed import debug


@dataclass(frozen=True)
class _TPState:
    rank: int
    world_size: int
    backend: str


_STATE: _TPState | None = None


def init_tensor_parallel(
    rank: int,
    world_size: int,
    backend: str,
    store: dist.Store,
    timeout: timedelta | None = None,
    device: torch.device | None = None,
    debug_collectives: bool = False,
) -> None:
    """Join the tensor-parallel group (the default process group) through a rendezvous store.

    With NCCL, `device` (this rank's GPU) becomes the current device and the communicator is created
    now (`device_id`), not lazily inside whichever collective comes first (possibly a CUDA-graph
    capture). Callers then pass `communication.tensor_parallel_barrier` together, so a rank that cannot
    join fails there, before loading. `debug_collectives` (same on every rank) starts the collective-sequence guard (debug.py)
    over an extra gloo group. Raises RuntimeError when this process is already in a group."""
    global _STATE
    if _STATE is not None or dist.is_initialized():
        raise RuntimeError(
            "a tensor-parallel engine is already running in this process; shut it down before starting another"
        )
    extra = {}
    if backend == "nccl":
        if device is None or device.type != "cuda":
            raise ValueError(f"the NCCL backend needs this rank's CUDA device, got {device}")
        torch.cuda.set_device(device)
        extra["device_id"] = device
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **extra)
    _STATE = _TPState(rank, world_size, backend)
    if debug_collectives:
        debug.enable(dist.new_group(backend="gloo"))


def destroy_tensor_parallel() -> None:
    """Leave the group (idempotent). Healthy ranks call it together: NCCL flushes pending work with
    the peers first, so it can block while a peer is stuck (use `abort_tensor_parallel` then).

    NOTE: NCCL >= 2.26 also blocks (forever) in destroy *and* abort while any CUDA graph that captured
    a collective of this group is alive: release the graphs first (ModelRunner.release_cuda_graphs)."""
    global _STATE
    _STATE = None
    debug.disable()
    if dist.is_initialized():
        dist.destroy_process_group()


def abort_tensor_parallel() -> None:
    """Leave the group without waiting for the peers (one of them died): NCCL communicators are
    aborted, which also ends collectives blocked on the dead peer."""
    global _STATE
    _STATE = None
    debug.disable()
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.distributed_c10d._abort_process_group()
        else:
            dist.destroy_process_group()


def is_tensor_parallel() -> bool:
    """True when this process is one of several TP ranks."""
    return _STATE is not None and _STATE.world_size > 1


def get_tp_rank() -> int:
    return 0 if _STATE is None else _STATE.rank


def get_tp_size() -> int:
    return 1 if _STATE is None else _STATE.world_size


def get_tp_backend() -> str | None:
    return None if _STATE is None else _STATE.backend


def backend_for_device(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def kv_head_layout(num_kv_heads: int, tp_size: int) -> tuple[int, int]:
    """(KV heads held per rank, ranks that hold each KV head)."""
    if num_kv_heads >= tp_size:
        return num_kv_heads // tp_size, 1
    return 1, tp_size // num_kv_heads


def _problems(tp: int, num_heads: int, num_kv_heads: int, intermediate_size: int) -> list[str]:
    problems = []
    if num_heads % tp:
        problems.append(f"the model's num_attention_heads {num_heads}")
    if num_kv_heads % tp and tp % num_kv_heads:
        problems.append(f"num_key_value_heads {num_kv_heads} (nor is it a multiple of it)")
    if intermediate_size % tp:
        problems.append(f"intermediate_size {intermediate_size}")
    return problems


def verify_tensor_parallel_size(tp: int, num_heads: int, num_kv_heads: int, intermediate_size: int) -> None:
    """Raise ValueError unless `tp` ranks can shard this architecture.

    The message starts "tensor_parallel_size N does not divide the model's num_attention_heads H"
    when the heads do not split (operators match on "tensor_parallel_size")."""
    problems = _problems(tp, num_heads, num_kv_heads, intermediate_size)
    if not problems:
        return
    valid = [n for n in range(1, num_heads + 1) if not _problems(n, num_heads, num_kv_heads, intermediate_size)]
    raise ValueError(
        f"tensor_parallel_size {tp} does not divide {' or '.join(problems)}; "
        f"valid tensor_parallel_size values for this model: {', '.join(map(str, valid))}"
    )


def verify_tensor_parallel_for_model_dir(tp: int, model: str) -> None:
    """`verify_tensor_parallel_size` against a local model directory's config.json.

    Sources that are not local yet (hf://) are skipped here; the engine checks them after download."""
    path = model.removeprefix("file://")
    config_path = os.path.join(path, "config.json")
    if tp == 1 or not os.path.isfile(config_path):
        return
    with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)
    heads = int(cfg["num_attention_heads"])
    verify_tensor_parallel_size(
        tp, heads, int(cfg.get("num_key_value_heads") or heads), int(cfg.get("intermediate_size") or heads)
    )
