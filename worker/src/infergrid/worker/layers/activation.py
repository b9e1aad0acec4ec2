"""Gated MLP activation: silu(gate) * up on a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class GatedActivation(nn.Module):
    """Splits the last dim in half: act(first) * second."""

    def __init__(self, hidden_act: str = "silu") -> None:
        super().__init__()
        if hidden_act not in _ACTS:
            raise ValueError(f"hidden_act must be one of {', '.join(_ACTS)}, got {hidden_act!r}")
        self.act = _ACTS[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.act is F.silu and x.dim() == 2:
            from infergrid.worker.layers.triton_ops import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up
