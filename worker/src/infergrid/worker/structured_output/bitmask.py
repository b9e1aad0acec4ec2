"""Applying a step's grammar bitmask to the logits: -inf where a row's bit is 0."""

from __future__ import annotations

import torch


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Mask `logits` [B, V] (in place; returned) with the bitmask [B, ceil(V / 32)] int32 (bit t of
    row b set = token t allowed; copied to the logits' device if it is not there yet). Uses xgrammar's
    kernel (Triton on GPU, C++ on CPU)."""
    import xgrammar as xgr

    mask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=logits.shape[1])
    return logits
