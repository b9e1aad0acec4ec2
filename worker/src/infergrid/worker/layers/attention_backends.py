"""Choosing the attention backend for a device (kept apart from attention.py, which the backends
import for `AttentionMetadata`)."""

from __future__ import annotations

import torch

from infergrid.worker import envs
from infergrid.worker.layers.attention import AttentionBackend
from infergrid.worker.layers.torch_attention import TorchAttentionBackend


def get_attention_backend(device: torch.device, name: str | None = None) -> AttentionBackend:
    """`name` (or INFERGRID_ATTENTION_BACKEND) picks `torch` or `triton`; default: triton on CUDA."""
    name = name or envs.attention_backend()
    if name is None:
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        if device.type != "cuda":
            raise ValueError("the triton attention backend needs a CUDA device")
        from infergrid.worker.layers.triton_attention import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"attention backend must be 'torch' or 'triton', got {name!r}")
