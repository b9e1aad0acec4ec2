"""Environment knobs of the worker, all under the INFERGRID_ prefix, read in one place."""

from __future__ import annotations

import os


def _get(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _flag(name: str, default: bool) -> bool:
    return _get(name, "1" if default else "0") not in ("0", "false", "no", "off")


def attention_backend() -> str | None:
    """INFERGRID_ATTENTION_BACKEND: force `torch` or `triton` (default: triton on CUDA, else torch)."""
    return _get("INFERGRID_ATTENTION_BACKEND")


def tp_debug() -> bool:
    """INFERGRID_TP_DEBUG=1: tensor-parallel ranks record every collective they issue and check, before and
    after each step's forward pass, over a separate gloo group, that all ranks issued the same sequence
    (distributed/debug.py)."""
    return _flag("INFERGRID_TP_DEBUG", False)


def emulate_cuda_graphs() -> bool:
    """INFERGRID_EMULATE_CUDA_GRAPHS=1 (tests): without CUDA, run the CUDA-graph code paths anyway, with
    an eager stand-in for each graph (capture runs the forward once, replay runs it again)."""
    return _flag("INFERGRID_EMULATE_CUDA_GRAPHS", False)


def default_model_cache_dir() -> str:
    """Where converted models live (GGUF sources, the demo model) unless `--model-cache-dir` / the engine's
    `model_cache_dir` says otherwise: $INFERGRID_CACHE/models (the cache root the test bed's binaries and
    the images use too), else $XDG_CACHE_HOME/infergrid/models, else ~/.cache/infergrid/models."""
    root = _get("INFERGRID_CACHE")
    if root is None:
        root = os.path.join(os.path.expanduser(_get("XDG_CACHE_HOME", "~/.cache") or "~/.cache"), "infergrid")
    return os.path.join(os.path.expanduser(root), "models")
