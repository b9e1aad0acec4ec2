"""Hugging Face model directory -> our model with weights on the target device.

Sources: a local directory, `file:///path`, or `hf://org/name[@revision]` (downloaded with
`huggingface_hub.snapshot_download`; needs network, never used by tests). A `.gguf` file (or a
directory holding one and no config.json) is converted once into a Hugging Face directory under the
model cache (gguf_checkpoint.py) and loaded from there. Weights come from
`*.safetensors` (sharded via `model.safetensors.index.json` or not), read lazily: a tensor-parallel
rank reads only its shard of each tensor (`safe_open(...).get_slice`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open

from infergrid.worker import envs
from infergrid.worker.gguf_checkpoint import find_gguf_file, gguf_model_dir
from infergrid.worker.layers.attention import AttentionBackend
from infergrid.worker.lazy_weight import LazyWeight
from infergrid.worker.model_config import ModelConfig, parse_dtype
from infergrid.worker.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def resolve_model_path(source: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """Turn a model source into a local directory, downloading `hf://` sources."""
    if source.startswith("file://"):
        source = source.removeprefix("file://")
    if source.startswith("hf://"):
        repo = source.removeprefix("hf://")
        if "@" in repo:
            repo, revision = repo.split("@", 1)
        from huggingface_hub import snapshot_download

        logger.info("downloading %s (revision %s) from the Hugging Face Hub", repo, revision or "main")
        return snapshot_download(repo, revision=revision, allow_patterns=_DOWNLOAD_PATTERNS)
    if not os.path.exists(source):
        raise ValueError(f"model path {source!r} is not a directory or a .gguf file "
                         "(use a local path, file:// or hf://)")
    gguf_file = find_gguf_file(source)
    if gguf_file is not None:
        return gguf_model_dir(gguf_file, cache_dir or envs.default_model_cache_dir())
    if not os.path.isdir(source):
        raise ValueError(f"model path {source!r} is not a directory (use a local path, file:// or hf://)")
    return source


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's weight files, from the shard index when there is one."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights in {model_dir!r}")
    return files


def iterate_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for every tensor of every shard, one at a time."""
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def iterate_lazy_weights(model_dir: str) -> Iterator[tuple[str, LazyWeight]]:
    """(name, LazyWeight) for every tensor of every shard; each is valid until the next is yielded."""
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                piece = f.get_slice(name)
                yield name, LazyWeight(piece, tuple(piece.get_shape()))


def resolve_dtype(dtype: str | torch.dtype, model_config: ModelConfig) -> torch.dtype:
    """`auto` -> the checkpoint's dtype; otherwise the named dtype."""
    if dtype == "auto":
        return model_config.torch_dtype
    return parse_dtype(dtype)


def load_model(
    model_dir: str,
    model_config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_position: int,
    backend: AttentionBackend,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> LlamaForCausalLM:
    """Build the model (rank `tp_rank`'s shard of it) directly on `device` in `dtype` and fill it
    from the checkpoint."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(model_config, max_position, backend, tp_rank, tp_size)
    finally:
        torch.set_default_dtype(previous)
    loaded = model.load_weights(iterate_lazy_weights(model_dir))
    missing = {n for n, _ in model.named_parameters()} - loaded
    if missing:
        raise ValueError(f"checkpoint {model_dir!r} lacks weights for: {', '.join(sorted(missing))}")
    model.eval()
    return model
