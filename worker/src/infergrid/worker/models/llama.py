"""Llama-family decoder: Llama 2/3 (incl. llama3 RoPE scaling), Mistral, Qwen2/2.5 (qkv bias),
Qwen3 (per-head q/k RMSNorm); tied or untied embeddings.

Tokens of the whole batch are flattened ([T, hidden]); attention reads and writes the paged KV cache
through `AttentionMetadata`. Parameter names follow Hugging Face except for the fused projections
(`qkv_proj`, `gate_up_proj`), which `load_weights` fills shard by shard. With `tp_size > 1` each rank
holds its Megatron shard (see distributed/parallel_state.py) and the hidden states stay replicated.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from infergrid.worker.layers.activation import GatedActivation
from infergrid.worker.layers.attention import Attention, AttentionBackend, AttentionMetadata
from infergrid.worker.layers.layernorm import RMSNorm
from infergrid.worker.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
)
from infergrid.worker.layers.rotary import RotaryEmbedding
from infergrid.worker.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from infergrid.worker.lazy_weight import LazyWeight
from infergrid.worker.model_config import ModelConfig


class LlamaAttention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend, tp_rank: int, tp_size: int
    ) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, self.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, bias=cfg.qkv_bias,
            tp_rank=tp_rank, tp_size=tp_size,
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias, tp_rank=tp_rank, tp_size=tp_size
        )
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.rotary_emb = rotary
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads, backend)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, meta)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [size, size], bias=cfg.mlp_bias, tp_rank=tp_rank, tp_size=tp_size
        )
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, bias=cfg.mlp_bias, tp_rank=tp_rank, tp_size=tp_size)
        self.act_fn = GatedActivation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend, tp_rank: int, tp_size: int
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, backend, tp_rank, tp_size)
        self.mlp = LlamaMLP(cfg, tp_rank, tp_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block on the residual stream: returns (this block's output, the residual sum so
        far); the next norm adds the two (fused)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(
        self, cfg: ModelConfig, max_position: int, backend: AttentionBackend, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_rank, tp_size)
        rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, rotary, backend, tp_rank, tp_size) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    """Decoder + LM head. `forward` returns final hidden states [T, hidden]; `compute_logits` maps the
    rows that sample to float32 logits [N, vocab] (on tensor-parallel rank 0; None on the others).
    `tp_rank`/`tp_size` pick this rank's shard of every weight."""

    # checkpoint name -> (our fused parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self, cfg: ModelConfig, max_position: int, backend: AttentionBackend, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        super().__init__()
        self.config = cfg
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.model = LlamaModel(cfg, max_position, backend, tp_rank, tp_size)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp_rank, tp_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.lm_head(hidden)
        return None if logits is None else logits.float()

    def attention_layers(self) -> list[Attention]:
        """The paged-attention modules, one per decoder layer, in order."""
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | LazyWeight]]) -> set[str]:
        """Load (name, tensor or LazyWeight) pairs in Hugging Face naming; returns the parameter names filled.

        Raises ValueError for an unknown name or a shape mismatch."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            target, shard = name, None
            for ckpt_part, (our_part, shard_id) in self.packed_modules_mapping.items():
                if f".{ckpt_part}." in name:
                    target, shard = name.replace(f".{ckpt_part}.", f".{our_part}."), shard_id
                    break
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter")
            loader = getattr(param, "weight_loader", None)
            with torch.no_grad():
                if loader is None:
                    default_weight_loader(param, tensor)
                elif shard is None:
                    loader(param, tensor)
                else:
                    loader(param, tensor, shard)
            loaded.add(target)
        if self.config.tie_word_embeddings and "model.embed_tokens.weight" in loaded:
            loaded.add("lm_head.weight")
        return loaded
