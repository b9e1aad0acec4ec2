"""LLM: the offline API, `LLM(model=path, **engine_args).generate(prompts, sampling_params)`."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch

from infergrid.worker.config import EngineConfig
from infergrid.worker.engine.llm_engine import LLMEngine
from infergrid.worker.outputs import RequestOutput
from infergrid.worker.sampling_params import SamplingParams
from infergrid.worker.tokenizer import apply_chat_template

PromptInput = str | Sequence[int]


def _normalise_prompts(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):  # one prompt of token ids
        return [prompts]  # type: ignore[list-item]
    return prompts  # type: ignore[return-value]


class LLM:
    """Load a model once, then generate for batches of prompts (all scheduled together).

    `shutdown()` (or leaving a `with LLM(...) as llm:` block) stops its tensor-parallel ranks and frees
    its GPU memory, so another engine can start in the same process."""

    def __init__(self, model: str, **engine_args: Any) -> None:
        self.llm_engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self._counter = itertools.count()
        self._is_shut_down = False

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the engine's ranks and release its memory (idempotent); generating afterwards raises."""
        if self._is_shut_down:
            return
        self._is_shut_down = True
        self.llm_engine.shutdown()
        del self.llm_engine  # the model, KV cache and CUDA graphs go with the engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def tokenizer(self) -> Any:
        if self._is_shut_down:
            raise RuntimeError("this LLM was shut down; create a new one")
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); outputs come back in prompt order.

        `sampling_params` is one SamplingParams for all prompts or one per prompt."""
        if self._is_shut_down:
            raise RuntimeError("this LLM was shut down; create a new one to generate")
        prompt_list = _normalise_prompts(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(prompt_list)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params_list) != len(prompt_list):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompt_list)} prompts")
        engine = self.llm_engine
        order: dict[str, int] = {}
        try:
            for i, (prompt, params) in enumerate(zip(prompt_list, params_list, strict=True)):
                request_id = str(next(self._counter))
                engine.add_request(request_id, prompt, params)
                order[request_id] = i
            results: dict[str, RequestOutput] = {}
            while len(results) < len(order):
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
        except BaseException:
            engine.abort_request(list(order))
            raise
        return sorted(results.values(), key=lambda o: order[o.request_id])

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [apply_chat_template(self.tokenizer, conv) for conv in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params)
