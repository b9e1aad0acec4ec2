"""LazyWeight: a checkpoint tensor that is read only when (and only in the slice) a rank needs it.

The loader yields LazyWeights backed by `safe_open(...).get_slice(name)`; a parallel layer's
`weight_loader` narrows one to its shard (`.narrow(dim, start, length)`, still lazy) and
`default_weight_loader` reads it (`.load()`), so a tensor-parallel rank reads 1/N of each sharded
tensor from disk instead of all of it.
"""

from __future__ import annotations

from typing import Any

import torch


class LazyWeight:
    """A view of a safetensors tensor: `shape`, `dim()`, `narrow()` and `load()` (reads the bytes)."""

    def __init__(self, source: Any, shape: tuple[int, ...], index: tuple[slice, ...] | None = None) -> None:
        self._source = source  # a safetensors slice object (supports [slice, ...])
        self._full_shape = tuple(shape)
        self._index = index if index is not None else tuple(slice(0, n) for n in shape)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(s.stop - s.start for s in self._index)

    def dim(self) -> int:
        return len(self._full_shape)

    def numel(self) -> int:
        return self.shape.numel()

    def narrow(self, dim: int, start: int, length: int) -> LazyWeight:
        """Like Tensor.narrow, without reading anything."""
        dim = dim % self.dim()
        current = self._index[dim]
        if start < 0 or length < 0 or current.start + start + length > current.stop:
            raise ValueError(f"narrow({dim}, {start}, {length}) is out of range for shape {tuple(self.shape)}")
        index = list(self._index)
        index[dim] = slice(current.start + start, current.start + start + length)
        return LazyWeight(self._source, self._full_shape, tuple(index))

    def load(self) -> torch.Tensor:
        """Read the selected slice from the checkpoint (CPU tensor)."""
        return self._source[self._index]


def materialize(weight: torch.Tensor | LazyWeight) -> torch.Tensor:
    """A tensor for either kind of weight."""
    return weight.load() if isinstance(weight, LazyWeight) else weight
