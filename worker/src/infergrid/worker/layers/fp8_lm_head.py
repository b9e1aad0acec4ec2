"""An LM head with FP8 (e4m3) weights: half the bytes of a bf16 head, for a draft model.

A small draft model's passes are dominated by its LM head: a 2-layer draft of a 1B-shape target
reads a 525 MB bf16 head (128k x 2048) per pass, ~125 us on an H200, against ~45 us for its two
layers' weights. Drafts need not be exact -- the target verifies them, and any draft distribution
q keeps the target's distribution exactly (sample/rejection_sampler.py) -- so the draft's head
may be quantized: per-tensor FP8 weights (scale = max |w| / 448) read in ~70 us
(`torch._scaled_mm`, cuBLASLt's FP8 GEMM; bench/results/spec_decode_h200.txt). Activations are cast
to FP8 as they are (after the final RMSNorm they are O(1), clamped to e4m3's +-448), rows padded to
a multiple of 16 as the FP8 GEMM requires.

Without an FP8 GEMM (CPU; GPUs before Hopper / Ada) the same quantized weights are dequantized once
and multiplied in the activations' dtype: the weights' rounding is the same, the activations' is not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def has_fp8_gemm(device: torch.device) -> bool:
    """Whether `device` runs torch._scaled_mm (CUDA compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8LMHead(torch.nn.Module):
    """hidden [M, H] -> logits [M, V] in the hidden's dtype, from FP8 weights (see the module docstring)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().max() / FP8_MAX).clamp(min=1e-12)
        quantized = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        self.out_dtype = weight.dtype
        # (the FP8 GEMM wants both of the weight's dimensions divisible by 16)
        self.use_fp8_gemm = has_fp8_gemm(weight.device) and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0
        if self.use_fp8_gemm:
            self.register_buffer("weight_t", quantized.t(), persistent=False)  # [H, V], column-major
            self.register_buffer("scale", scale.reshape(()), persistent=False)
            self.register_buffer("one", torch.ones((), device=weight.device), persistent=False)
        else:
            self.register_buffer("weight", (quantized.float() * scale).to(weight.dtype), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not self.use_fp8_gemm:
            return F.linear(hidden, self.weight)
        rows = hidden.shape[0]
        padded = -(-rows // 16) * 16
        x = hidden.clamp(-FP8_MAX, FP8_MAX).to(FP8)
        if padded != rows:
            x = F.pad(x.view(torch.uint8), (0, 0, 0, padded - rows)).view(FP8)
        out = torch._scaled_mm(x, self.weight_t, scale_a=self.one, scale_b=self.scale, out_dtype=self.out_dtype)
        return out[:rows]
