"""Triton where the torch build ships it (CUDA wheels), None where it does not (CPU wheels).

Modules whose kernels have a torch fallback import it from here and check `triton is not None`
(layers/triton_ops.py and triton_attention.py are imported on CUDA only and import triton directly)."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch wheels for CUDA ship triton
    triton = tl = None  # type: ignore[assignment]

__all__ = ["tl", "triton"]
