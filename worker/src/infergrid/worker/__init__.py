"""infergrid worker: the inference engine (offline `LLM`, `AsyncLLM`) and its HTTP server.

    from infergrid.worker import LLM, SamplingParams
    outs = LLM(model="/path/to/model").generate(["Hello"], SamplingParams(max_tokens=8))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["LLM", "AsyncLLM", "EngineConfig", "RequestOutput", "CompletionOutput", "SamplingParams"]

_EXPORTS = {
    "LLM": "infergrid.worker.llm",
    "AsyncLLM": "infergrid.worker.engine.async_llm",
    "EngineConfig": "infergrid.worker.config",
    "RequestOutput": "infergrid.worker.outputs",
    "CompletionOutput": "infergrid.worker.outputs",
    "SamplingParams": "infergrid.worker.sampling_params",
}

if TYPE_CHECKING:
    from infergrid.worker.config import EngineConfig
    from infergrid.worker.engine.async_llm import AsyncLLM
    from infergrid.worker.llm import LLM
    from infergrid.worker.outputs import CompletionOutput, RequestOutput
    from infergrid.worker.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    """Import lazily, so `import infergrid.worker.<light module>` does not load torch."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'infergrid.worker' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
