"""Small host-to-device copies through one reused pinned buffer.

Every step uploads a handful of small arrays (input ids, positions, slot mappings, sampling
parameters, draft indices). `tensor.pin_memory().to(device, non_blocking=True)` costs ~30 us of
host time each (a pinned allocation, a pointer-attribute query, the copy), which on a host-bound
decode loop is a visible share of the step. `PinnedStaging` copies the data into a slice of one
pinned buffer instead and launches the asynchronous copy from there:

    buffer:  [ half A ............ | half B ............ ]   slices handed out in order, wrapping

A slice may be reused only once the copy that read it has run. Leaving a half records a CUDA event;
entering a half waits for the event recorded when it was last left, i.e. for copies launched a whole
half's worth of uploads ago (hundreds of steps), so the wait is over before it starts in practice.
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_BYTES = 8 << 20
ALIGN = 64


class PinnedStaging:
    """Uploads host tensors to `device` without waiting for it (see the module docstring)."""

    def __init__(self, device: torch.device, num_bytes: int = DEFAULT_BYTES) -> None:
        self.device = device
        self.half = num_bytes // 2
        self.buffer = torch.empty(2 * self.half, dtype=torch.uint8, pin_memory=True)
        self.offset = 0
        self.left: list[torch.cuda.Event | None] = [None, None]  # per half: recorded when last left

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous CPU tensor -> the same values on the device (an asynchronous copy)."""
        num_bytes = t.numel() * t.element_size()
        if num_bytes > self.half // 4:  # (a large one: its own pinned copy)
            return t.pin_memory().to(self.device, non_blocking=True)
        start = self._reserve(-(-num_bytes // ALIGN) * ALIGN)
        staged = self.buffer[start : start + num_bytes].view(t.dtype).view(t.shape)
        staged.copy_(t)
        return staged.to(self.device, non_blocking=True)

    def from_numpy(self, array: np.ndarray) -> torch.Tensor:
        return self.to_device(torch.from_numpy(np.ascontiguousarray(array)))

    def _reserve(self, num_bytes: int) -> int:
        start, half = self.offset, self.half
        current = 0 if start < half else 1
        if start - current * half + num_bytes > half:  # does not fit in this half: move to the other one
            event = torch.cuda.Event()
            event.record()
            self.left[current] = event
            current = 1 - current
            start = current * half
            waiting = self.left[current]
            if waiting is not None:
                waiting.synchronize()
        self.offset = start + num_bytes
        return start
