"""Linear layers with a `weight_loader` per parameter (nano-vllm style).

Each parameter knows how to take its slice of a checkpoint tensor, so fused projections (q/k/v into
`qkv_proj`, gate/up into `gate_up_proj`) and tensor-parallel shards load through one path; given a
LazyWeight (see lazy_weight.py) a rank reads only its shard from the checkpoint.
`tp_rank`/`tp_size` default to a single rank; column layers split the output dim, row layers the
input dim (and all-reduce their output when `tp_size > 1`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from infergrid.worker.distributed.communication import tensor_parallel_all_reduce
from infergrid.worker.distributed.parallel_state import kv_head_layout
from infergrid.worker.lazy_weight import LazyWeight, materialize


def _attach_loader(param: nn.Parameter, loader: object) -> None:
    param.weight_loader = loader  # type: ignore[attr-defined]


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor | LazyWeight) -> None:
    """Copy a whole checkpoint tensor (or a LazyWeight, read now) into `param` (shapes must match)."""
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(materialize(loaded))


class LinearBase(nn.Module):
    """y = x W^T (+ b) with W of shape [out, in] as stored by Hugging Face."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        _attach_loader(self.weight, self.weight_loader)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            _attach_loader(self.bias, self.weight_loader)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor | LazyWeight) -> None:
        default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    """The full matrix on every rank."""


class ColumnParallelLinear(LinearBase):
    """Splits the output dimension across ranks; output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        if out_features % tp_size:
            raise ValueError(f"out_features {out_features} is not divisible by tp_size {tp_size}")
        super().__init__(in_features, out_features // tp_size, bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor | LazyWeight) -> None:
        size = param.shape[0]
        default_weight_loader(param, loaded.narrow(0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column projections of the same input in one matrix (e.g. [gate | up])."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        self.out_sizes = list(out_sizes)
        super().__init__(in_features, sum(out_sizes), bias, tp_rank, tp_size)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor | LazyWeight, shard_id: int | None = None
    ) -> None:
        if shard_id is None:
            return super().weight_loader(param, loaded)
        size = self.out_sizes[shard_id] // self.tp_size
        offset = sum(self.out_sizes[:shard_id]) // self.tp_size
        shard = loaded.narrow(0, self.tp_rank * size, size)
        default_weight_loader(param.narrow(0, offset, size), shard)  # type: ignore[arg-type]


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused: output [q heads | k heads | v heads] of this rank.

    With fewer KV heads than ranks, each KV head is replicated: rank r holds KV head
    r // (tp_size // num_kv_heads)."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        if num_heads % tp_size or (num_kv_heads % tp_size and tp_size % num_kv_heads):
            raise ValueError(f"heads ({num_heads}, kv {num_kv_heads}) do not split over tp_size {tp_size}")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp_size
        self.num_kv_heads, self.num_kv_head_replicas = kv_head_layout(num_kv_heads, tp_size)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size  # per rank after the split
        super().__init__(hidden_size, out, bias, tp_rank, tp_size)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor | LazyWeight, shard_id: str | None = None
    ) -> None:
        if shard_id is None:
            if self.tp_size > 1:
                raise ValueError("a fused qkv checkpoint tensor cannot be sharded; load q, k and v separately")
            return super().weight_loader(param, loaded)
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        size, offset = {"q": (q_size, 0), "k": (kv_size, q_size), "v": (kv_size, q_size + kv_size)}[shard_id]
        shard_index = self.tp_rank if shard_id == "q" else self.tp_rank // self.num_kv_head_replicas
        shard = loaded.narrow(0, shard_index * size, size)
        default_weight_loader(param.narrow(0, offset, size), shard)  # type: ignore[arg-type]


class RowParallelLinear(LinearBase):
    """Splits the input dimension across ranks; partial outputs are summed (all-reduce)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        if in_features % tp_size:
            raise ValueError(f"in_features {in_features} is not divisible by tp_size {tp_size}")
        super().__init__(in_features // tp_size, out_features, bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor | LazyWeight) -> None:
        if param.dim() == 1:  # bias: added once, after the reduction
            return default_weight_loader(param, loaded)
        size = param.shape[1]
        default_weight_loader(param, loaded.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        return tensor_parallel_all_reduce(y) if self.tp_size > 1 else y
