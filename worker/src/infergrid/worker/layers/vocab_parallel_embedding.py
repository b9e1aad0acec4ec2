"""Token embedding and LM head split by vocabulary rows across tensor-parallel ranks.

The vocabulary is padded to a multiple of tp_size; rank r holds rows [r*V/N, (r+1)*V/N) (padding rows
are zero). The embedding looks up the ids it holds, zeroes the others and all-reduces; the LM head
computes its slice of the logits and gathers the slices on rank 0, the only rank that samples.
With tp_size 1 both are a plain nn.Embedding / bias-free linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from infergrid.worker.distributed.communication import tensor_parallel_all_reduce, tensor_parallel_gather
from infergrid.worker.layers.linear import default_weight_loader
from infergrid.worker.lazy_weight import LazyWeight


class VocabParallelEmbedding(nn.Module):
    """Embedding rows [vocab_start, vocab_end) of this rank."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.num_embeddings_per_rank = -(-num_embeddings // tp_size)
        self.vocab_start = min(tp_rank * self.num_embeddings_per_rank, num_embeddings)
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_rank, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor | LazyWeight) -> None:
        if loaded.shape[0] != self.num_embeddings:
            raise ValueError(f"shape mismatch: vocabulary {self.num_embeddings} vs checkpoint {tuple(loaded.shape)}")
        num_rows = self.vocab_end - self.vocab_start
        param.data[num_rows:].zero_()
        if num_rows:
            default_weight_loader(param.narrow(0, 0, num_rows), loaded.narrow(0, self.vocab_start, num_rows))  # type: ignore[arg-type]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        is_local = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(is_local, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(~is_local.unsqueeze(-1), 0)
        return tensor_parallel_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden [N, H] -> logits [N, vocab] on rank 0 (None on the other ranks); no bias."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        logits = F.linear(hidden, self.weight)
        if self.tp_size == 1:
            return logits
        gathered = tensor_parallel_gather(logits, dim=-1)
        return None if gathered is None else gathered[..., : self.num_embeddings]
