"""Random-weight Llama checkpoints of named shapes, for benchmarks (nothing is downloaded).

    from shapes import make_random_checkpoint      # run benches as `python bench/<name>.py`
    path = make_random_checkpoint("1b")            # a normal HF directory the engine's loader reads

Shapes (keyword overrides make variants, e.g. a shallow speculative draft): "tiny" (CPU smoke tests), "1b" (Llama-3.2-1B: hidden 2048, 16 layers, 32 heads, 8 KV heads,
intermediate 8192, vocab 128256, tied embeddings), "8b" (Llama-3.1-8B: hidden 4096, 32 layers, 32 heads,
8 KV heads, intermediate 14336, vocab 128256). The directory holds config.json, safetensors shards
(with an index), generation_config.json and a word-level tokenizer with one token per id ("t<id>"),
so any id the model can emit decodes. Weights are N(0, 0.02) from a fixed seed (norms are 1), made on
the GPU when there is one. A finished directory is reused (keyed by shape, dtype and seed), so several
benches in one run pay for it once; INFERGRID_BENCH_CACHE picks its parent (default: the temp dir).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

PAD, BOS, EOS = 0, 1, 2
FIRST_TOKEN_ID = EOS + 1  # the first ordinary id (below: the tokenizer's specials)
_SHARD_BYTES = 2 << 30
_INIT_STD = 0.02


@dataclass(frozen=True)
class Shape:
    """The architecture numbers of one Llama-family checkpoint."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_params(self) -> int:
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embed + h


def _llama3_scaling(factor: float) -> dict[str, Any]:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


SHAPES: dict[str, Shape] = {
    "tiny": Shape(64, 2, 4, 2, 128, 1024, max_position_embeddings=8192, tie_word_embeddings=True,
                  rope_theta=10000.0),
    "1b": Shape(2048, 16, 32, 8, 8192, 128256, tie_word_embeddings=True, rope_scaling=_llama3_scaling(32.0)),
    "8b": Shape(4096, 32, 32, 8, 14336, 128256, rope_scaling=_llama3_scaling(8.0)),
}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {name!r}")
    return SHAPES[name]


def hf_config(shape: Shape, dtype: str) -> dict[str, Any]:
    """config.json contents for `shape` (LlamaForCausalLM)."""
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_theta": shape.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "dtype": dtype,
        "torch_dtype": dtype,
        # Old-style config (rope_theta + rope_scaling); a 4.x version also keeps transformers from
        # applying its Mistral tokenizer-regex check (and warning) to our word-level tokenizer.
        "transformers_version": "4.57.1",
    }
    if shape.rope_scaling is not None:
        cfg["rope_scaling"] = dict(shape.rope_scaling)
    return cfg


def tensor_shapes(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(HF tensor name, size) of every weight, in checkpoint order."""
    h, kv, inter = shape.hidden_size, shape.num_key_value_heads * shape.head_dim, shape.intermediate_size
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab_size, h))]
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    names.append(("model.norm.weight", (h,)))
    if not shape.tie_word_embeddings:
        names.append(("lm_head.weight", (shape.vocab_size, h)))
    return names


def successor_maps(vocab_size: int, seed: int, agreement: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(succ, draft_succ): `succ` is one random cycle through the ordinary token ids (specials map to
    themselves); `draft_succ` equals it on a random `agreement` share of the ids and differs on the
    rest (succ after a cycle through those ids, so it is a permutation too). A "copy" checkpoint whose
    LM head is its embedding re-indexed by a successor map (`head_successor`) predicts succ(input)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(vocab_size - FIRST_TOKEN_ID, generator=gen) + FIRST_TOKEN_ID
    succ = torch.arange(vocab_size)
    succ[order] = torch.roll(order, -1)
    changed = order[torch.randperm(order.numel(), generator=gen)[: round((1.0 - agreement) * order.numel())]]
    shift = torch.arange(vocab_size)
    if changed.numel() > 1:
        shift[changed] = torch.roll(changed, -1)  # a cycle through the changed ids: no fixed point
    return succ, succ[shift]


def _write_weights(out: str, shape: Shape, dtype: torch.dtype, seed: int, device: torch.device,
                   layer_init_std: float = _INIT_STD, head_successor: tuple[int, float] | None = None) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    weight_map: dict[str, str] = {}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0

    def flush() -> None:
        nonlocal size
        name = f"model-{len(shards):05d}.safetensors"
        save_file(shards[-1], os.path.join(out, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shards[-1], name))
        shards.append({})
        size = 0

    embed: torch.Tensor | None = None
    for name, dims in tensor_shapes(shape):
        if len(dims) == 1:
            tensor = torch.ones(dims, dtype=dtype)
        elif name == "lm_head.weight" and head_successor is not None:
            assert embed is not None
            succ_seed, agreement = head_successor
            succ = successor_maps(shape.vocab_size, succ_seed, agreement)[1]  # (== succ at agreement 1)
            tensor = torch.empty_like(embed)
            tensor[succ] = embed  # logit of succ(x) = <embed[x], hidden ~ embed[x]>: the largest
        else:
            std = layer_init_std if name.startswith("model.layers.") else _INIT_STD
            tensor = torch.empty(dims, dtype=torch.float32, device=device).normal_(0.0, std, generator=gen)
            tensor = tensor.to(dtype).cpu()
        if name == "model.embed_tokens.weight":
            embed = tensor
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            flush()
        shards[-1][name] = tensor
        size += nbytes
        total += nbytes
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(out, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)


def _write_tokenizer(out: str, vocab_size: int) -> None:
    """A word-level tokenizer: id i <-> "t<i>" (specials <pad>, <s>, </s> at 0, 1, 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}
    vocab = {specials.get(i, f"t{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok.add_special_tokens(list(specials.values()))
    tok.save(os.path.join(out, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<pad>",
        "add_bos_token": True, "clean_up_tokenization_spaces": False, "model_max_length": 1 << 20,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)


def default_dir(name: str, dtype: str, seed: int) -> str:
    root = os.environ.get("INFERGRID_BENCH_CACHE") or tempfile.gettempdir()
    return os.path.join(root, f"infergrid-random-{name}-{dtype}-seed{seed}")


def make_random_checkpoint(
    name: str, out: str | None = None, *, dtype: str = "bfloat16", seed: int = 0, device: str | None = None,
    layer_init_std: float = _INIT_STD, head_successor: tuple[int, float] | None = None, **shape_overrides: Any,
) -> str:
    """Write (or reuse) a random checkpoint of shape `name` at `out` (default: `default_dir`); returns it.

    `shape_overrides` change Shape fields, e.g. `num_hidden_layers=2, tie_word_embeddings=False` for a
    shallow speculative draft of the same width and vocabulary; the default directory then gets a
    suffix naming them. `layer_init_std` sets the std of the decoder layers' matrices (embeddings
    keep 0.02): a tiny value (e.g. 5e-4) leaves the residual stream ~ the input embedding, so a model
    with tied embeddings "copies" (predicts its input token), at the full shape's cost per step.
    `head_successor=(seed, agreement)` (untied shapes) makes such a model predict a successor instead:
    its LM head is its embedding re-indexed by `successor_maps(vocab, seed, agreement)[1]` (at agreement
    1, succ), so a target with agreement 1 and a draft with agreement p agree on a
    share p of the tokens."""
    shape = get_shape(name)
    suffix = ""
    if shape_overrides:
        shape = replace(shape, **shape_overrides)
        suffix += "".join(f"-{k}={v}" for k, v in sorted(shape_overrides.items()))
    if layer_init_std != _INIT_STD:
        suffix += f"-layerstd={layer_init_std:g}"
    if head_successor is not None:
        if shape.tie_word_embeddings:
            raise ValueError("head_successor needs an untied LM head (tie_word_embeddings=False)")
        suffix += f"-succ={head_successor[0]},{head_successor[1]:g}"
    out = out or default_dir(name, dtype, seed) + suffix
    stamp: dict[str, Any] = {"shape": asdict(shape), "dtype": dtype, "seed": seed}
    if layer_init_std != _INIT_STD:
        stamp["layer_init_std"] = layer_init_std
    if head_successor is not None:
        stamp["head_successor"] = list(head_successor)
    marker = os.path.join(out, ".complete.json")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == stamp:
                return out
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".", dir=os.path.dirname(os.path.abspath(out)))
    try:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config(shape, dtype), f, indent=1)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}, f)
        _write_tokenizer(tmp, shape.vocab_size)
        _write_weights(tmp, shape, torch_dtype, seed, dev, layer_init_std, head_successor)
        with open(os.path.join(tmp, ".complete.json"), "w", encoding="utf-8") as f:
            json.dump(stamp, f)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
