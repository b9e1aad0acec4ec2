"""GGUF files (llama.cpp's format) -> a normal Hugging Face directory the engine loads.

A model source that is a `.gguf` file, or a directory holding exactly one `.gguf` and no config.json,
is converted once: the `gguf` package reads the metadata and dequantizes every tensor to float32,
tensor names are mapped to Hugging Face's, Llama's Q/K rows are un-permuted (llama.cpp's converter
interleaves them for its rotary layout), and transformers' GGUF tokenizer converter writes the
tokenizer files with the chat template. The result (config.json, model.safetensors, tokenizer files,
generation_config.json) is cached under the model cache keyed by the file's sha256, so a restart or a
second tensor-parallel rank reuses it.

Architectures: llama (also Mistral and SmolLM exports; Llama 3.1+ RoPE scaling is recovered from the
`rope_freqs` divisors llama.cpp stores), qwen2, qwen3. Quantization types: whatever the
`gguf` package can dequantize (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, ...);
anything else is refused with the tensor and type named.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# GGUF general.architecture -> the Hugging Face architecture our engine loads
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}

# llama.cpp tensor name (after `blk.N.`) -> Hugging Face name (after `model.layers.N.`)
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Llama 3.1+ RoPE scaling: llama.cpp stores per-frequency divisors (`rope_freqs.weight`) instead of the
# parameters; they are matched against Llama 3's scheme with its published constants and become config.
ROPE_FREQS = "rope_freqs.weight"
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_IGNORED = {ROPE_FREQS}
_LAYER = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

CONVERTED_MARKER = "infergrid-gguf.json"
MAX_SHARD_BYTES = 2 << 30


class GGUFError(ValueError):
    """A GGUF file this reader cannot turn into a checkpoint (architecture, tensor or type)."""


def find_gguf_file(path: str) -> str | None:
    """The GGUF file a model source names: `path` itself if it ends in .gguf, or the one .gguf in a
    directory without config.json; None when `path` is an ordinary checkpoint directory."""
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return path
        raise ValueError(f"model path {path!r} is a file but not a .gguf file")
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    found = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(found) > 1:
        names = ", ".join(os.path.basename(f) for f in found)
        raise ValueError(f"model directory {path!r} holds several GGUF files ({names}): name one of them")
    return found[0] if found else None


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def _open(path: str) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise GGUFError(f"{path!r} is not a readable GGUF file: {exc}") from exc


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader: Any) -> dict[str, Any]:
    """The Hugging Face config.json for the GGUF file's model; GGUFError for other architectures."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    hf_arch = ARCHITECTURES[arch]
    name = str(_field(reader, "general.name", "") or "").lower()
    if arch == "llama" and "mistral" in name:
        hf_arch = "MistralForCausalLM"
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    num_heads = int(_field(reader, f"{arch}.attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None:
        raise GGUFError("GGUF file names no vocabulary size (no vocab_size and no tokenizer.ggml.tokens)")
    tensor_names = {t.name for t in reader.tensors}
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": MODEL_TYPES.get(hf_arch, "mistral"),
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // num_heads)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names and arch != "qwen2",
        "torch_dtype": "float32",
    }
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise GGUFError(f"GGUF rope scaling {scaling!r} is not supported (only linear)")
        config["rope_scaling"] = {"rope_type": "linear",
                                  "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
    if ROPE_FREQS in tensor_names:
        freqs = dequantized_tensor(next(t for t in reader.tensors if t.name == ROPE_FREQS)).reshape(-1)
        config["rope_scaling"] = llama3_rope_scaling(freqs, config["head_dim"], config["rope_theta"])
    for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
        value = _field(reader, f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            config[key] = int(value)
    return config


def llama3_rope_divisors(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                         high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """What llama.cpp stores as rope_freqs for Llama 3 RoPE scaling: inv_freq / scaled inv_freq."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    divisors = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelen < original_max_position_embeddings / high_freq_factor, 1.0, divisors)
    return np.where(wavelen > original_max_position_embeddings / low_freq_factor, factor, divisors)


def llama3_rope_scaling(divisors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any]:
    """The rope_scaling config whose Llama 3 divisors are `divisors`; GGUFError for any other scheme."""
    factor = float(divisors.max())
    expected = llama3_rope_divisors(head_dim, theta, factor, **LLAMA3_ROPE)
    if divisors.shape != expected.shape or not np.allclose(divisors, expected, rtol=1e-3):
        raise GGUFError(f"GGUF {ROPE_FREQS} does not follow Llama 3 RoPE scaling (factor {factor:g}, "
                        f"{', '.join(f'{k} {v:g}' for k, v in LLAMA3_ROPE.items())}): not supported")
    return {"rope_type": "llama3", "factor": factor, **LLAMA3_ROPE}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _IGNORED:
        return None
    match = _LAYER.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise GGUFError(f"GGUF tensor {gguf_name!r} has no counterpart in a Llama-family checkpoint")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of Q/K rows: per head, rows [0, 2, 4, ..., 1, 3, 5, ...]
    were stored interleaved as pairs; put the two halves back."""
    rows = weight.shape[0]
    pairs = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def dequantized_tensor(tensor: Any) -> np.ndarray:
    """One GGUF tensor as a float32 array in PyTorch's (row-major, outer dim first) shape."""
    from gguf import GGMLQuantizationType, dequantize

    qtype = GGMLQuantizationType(tensor.tensor_type)
    try:
        values = dequantize(tensor.data, qtype)
    except NotImplementedError as exc:
        raise GGUFError(
            f"GGUF tensor {tensor.name!r} uses quantization type {qtype.name}, which the gguf package "
            f"cannot dequantize ({exc})"
        ) from exc
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest-moving dim first
    return np.asarray(values, dtype=np.float32).reshape(shape)


def gguf_weights(reader: Any, config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for every weight of the GGUF file."""
    needs_unpermute = config["model_type"] in ("llama", "mistral")
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            continue
        weight = dequantized_tensor(tensor)
        if needs_unpermute and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            weight = _unpermute(weight, heads)
        yield name, torch.from_numpy(np.array(weight, dtype=np.float32, order="C"))


def _write_tokenizer(gguf_path: str, out: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_path)),
                                              gguf_file=os.path.basename(gguf_path))
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("%s carries no chat template: chat requests will be refused", gguf_path)
    tokenizer.save_pretrained(out)
    # Readable by transformers 4.x too: the generic fast class, the template inside the config.
    path = os.path.join(out, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if getattr(tokenizer, "chat_template", None):
        tokenizer_config["chat_template"] = tokenizer.chat_template
    tokenizer_config.pop("is_local", None)
    tokenizer_config.pop("local_files_only", None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)


def write_weights(weights: Iterator[tuple[str, torch.Tensor]], out: str, skip: set[str] | None = None,
                  max_shard_bytes: int | None = None) -> None:
    """model.safetensors, or model-0000N.safetensors shards + index once past `max_shard_bytes`: only one
    shard of dequantized float32 tensors is held in memory at a time (a 7B GGUF is 28 GB as float32)."""
    from safetensors.torch import save_file

    skip = skip or set()
    max_shard_bytes = max_shard_bytes or MAX_SHARD_BYTES
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    names: list[list[str]] = [[]]

    def flush() -> None:
        save_file(shards[-1], os.path.join(out, f".shard-{len(names)}"), metadata={"format": "pt"})
        shards[-1] = {}

    for name, tensor in weights:
        if name in skip:
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            flush()
            shards.append({})
            sizes.append(0)
            names.append([])
        shards[-1][name] = tensor
        sizes[-1] += nbytes
        names[-1].append(name)
    flush()
    if len(names) == 1:
        os.rename(os.path.join(out, ".shard-1"), os.path.join(out, "model.safetensors"))
        return
    weight_map = {}
    for i, shard_names in enumerate(names, 1):
        file_name = f"model-{i:05d}-of-{len(names):05d}.safetensors"
        os.rename(os.path.join(out, f".shard-{i}"), os.path.join(out, file_name))
        weight_map.update(dict.fromkeys(shard_names, file_name))
    with open(os.path.join(out, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)


def _make_readable(directory: str) -> None:
    """mkdtemp makes 0700: let other users (a pod's non-root uid over a hostPath) read the result."""
    os.chmod(directory, 0o755)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o644)


def convert_gguf(gguf_path: str, out: str, sha256: str | None = None) -> str:
    """Write the Hugging Face directory for `gguf_path` to `out` (atomically: a temporary sibling
    renamed into place); returns `out`. Raises GGUFError for what it cannot read, ValueError when
    `out` holds something else (only an earlier conversion is ever replaced)."""
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, CONVERTED_MARKER)):
        raise ValueError(f"{out!r} exists and is not a GGUF conversion of ours: give a new or empty directory")
    reader = _open(gguf_path)
    config = gguf_config(reader)
    if "tokenizer.ggml.model" not in reader.fields:
        raise GGUFError(f"{gguf_path!r} carries no tokenizer (no tokenizer.ggml.* fields): serve the Hugging "
                        "Face checkpoint instead")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    try:
        write_weights(gguf_weights(reader, config), tmp, skip={"lm_head.weight"} if config["tie_word_embeddings"] else set())
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(generation, f, indent=2)
        _write_tokenizer(gguf_path, tmp)
        with open(os.path.join(tmp, CONVERTED_MARKER), "w", encoding="utf-8") as f:
            json.dump({"source": os.path.abspath(gguf_path), "sha256": sha256 or file_sha256(gguf_path)}, f)
        _make_readable(tmp)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_converted(model_dir: str, sha256: str) -> bool:
    """`model_dir` holds a finished conversion of the GGUF file with this sha256."""
    try:
        with open(os.path.join(model_dir, CONVERTED_MARKER), encoding="utf-8") as f:
            return json.load(f).get("sha256") == sha256
    except (OSError, ValueError):
        return False


def cached_conversion(gguf_path: str, out: str, sha256: str) -> str:
    """`out` holding the conversion of `gguf_path` (whose sha256 is given), converting it unless a
    finished one is there. A lock file beside `out` makes concurrent callers (workers, TP ranks)
    wait for one conversion instead of each doing it."""
    if is_converted(out, sha256):
        return out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(f"{out}.lock", "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not is_converted(out, sha256):
                logger.info("converting %s (dequantizing to float32) into %s", gguf_path, out)
                convert_gguf(gguf_path, out, sha256=sha256)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def gguf_model_dir(gguf_path: str, cache_dir: str) -> str:
    """The converted directory for `gguf_path` under `cache_dir/gguf`, converting on first use."""
    sha = file_sha256(gguf_path)
    stem = os.path.basename(gguf_path).removesuffix(".gguf")
    return cached_conversion(gguf_path, os.path.join(cache_dir, "gguf", f"{stem}-{sha[:16]}"), sha)
