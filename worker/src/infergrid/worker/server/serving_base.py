"""What every generation endpoint shares: model-name check, prompt checks, SamplingParams from a
request, and one engine request run to completion with metrics, abort-on-exit and admission."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

from infergrid.worker.engine.async_llm import EngineDeadError, EngineShuttingDownError
from infergrid.worker.sampling_params import SamplingParams
from infergrid.worker.structured_output.params import StructuredOutputsParams

from .admission import AdmissionController
from .errors import APIError, bad_request
from .lifecycle import Lifecycle
from .metrics import RequestTimer, ServerMetrics
from .protocol import SamplingFields

T = TypeVar("T")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptInput:
    """One prompt as the engine gets it (token ids) plus its text when known."""

    token_ids: list[int]
    text: str | None = None


def param_of_value_error(message: str, default: str | None = None) -> str | None:
    """SamplingParams' ValueError messages start with the field name ("top_k must be ...")."""
    head = message.split(" ", 1)[0]
    return head if head.isidentifier() else default


class ServingBase:
    """Shared state and helpers of the completion, chat and seed endpoints."""

    def __init__(self, lifecycle: Lifecycle, admission: AdmissionController, metrics: ServerMetrics,
                 served_model_names: Sequence[str]) -> None:
        self.lifecycle = lifecycle
        self.admission = admission
        self.metrics = metrics
        self.served_model_names = list(served_model_names)

    # ----------------------------------------------------------------------------------- engine
    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def engine(self) -> Any:
        engine = self.lifecycle.engine
        if engine is None or self.lifecycle.state == "loading":
            raise APIError(503, "Model is not ready yet", code="not_ready", headers={"Retry-After": "1"})
        return engine

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)  # (503 while the model loads, like every engine access)

    @property
    def vocab_size(self) -> int:
        return int(self.engine.model_config.vocab_size)

    def check_model(self, model: str | None) -> None:
        """404 unless `model` is one of the served names (None means the default model)."""
        if model is not None and model not in self.served_model_names:
            raise APIError(404, f"The model {model!r} does not exist; this server serves "
                                f"{', '.join(repr(m) for m in self.served_model_names)}",
                           param="model", code="model_not_found")

    # ---------------------------------------------------------------------------------- prompts
    def encode(self, text: str) -> list[int]:
        """Tokenize a completion prompt (with the model's BOS, as vLLM does)."""
        return list(self.tokenizer(text)["input_ids"])

    def prompt_from_text(self, text: str, param: str) -> PromptInput:
        if not text:
            raise bad_request(f"'{param}' must not be empty", param)
        try:
            ids = self.encode(text)
        except Exception as exc:  # noqa: BLE001 - e.g. lone surrogates the tokenizer cannot take
            raise bad_request(f"'{param}' could not be tokenized: {type(exc).__name__}", param) from exc
        if not ids:
            raise bad_request(f"'{param}' encodes to no tokens", param)
        return PromptInput(ids, text)

    def prompt_from_ids(self, ids: Sequence[int], param: str) -> PromptInput:
        if not ids:
            raise bad_request(f"'{param}' must not be empty", param)
        vocab_size = self.vocab_size
        bad = next((t for t in ids if t >= vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} in '{param}' is out of range [0, {vocab_size})", param)
        return PromptInput(list(ids))

    def check_length(self, prompt: PromptInput, max_tokens: int | None, param: str,
                     max_tokens_param: str = "max_tokens") -> None:
        """400 when prompt tokens + max_tokens do not fit max_model_len (or the KV pool)."""
        limit = self.max_model_len
        num = len(prompt.token_ids)
        if num >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens, but the prompt has "
                              f"{num} tokens (at least one token must be left to generate)", param,
                              code="context_length_exceeded")
        if max_tokens is not None and num + max_tokens > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens; the prompt has {num} "
                              f"tokens and max_tokens is {max_tokens} ({num + max_tokens} in total)",
                              max_tokens_param, code="context_length_exceeded")

    # --------------------------------------------------------------------------------- sampling
    def sampling_params(self, req: SamplingFields, *, max_tokens: int | None, n: int = 1,
                        logprobs: int | None = None,
                        structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        """SamplingParams from the request's fields (400 naming the field if the engine refuses)."""
        logit_bias = getattr(req, "logit_bias", None)
        if logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias", code="unsupported_parameter")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        top_k = req.top_k if req.top_k is not None else -1
        if top_k > self.vocab_size:
            top_k = -1  # keeping more tokens than exist is the same as no top-k
        kwargs: dict[str, Any] = {
            "n": n, "max_tokens": max_tokens, "min_tokens": req.min_tokens, "top_k": top_k,
            "seed": req.seed, "stop": stop, "stop_token_ids": req.stop_token_ids, "ignore_eos": req.ignore_eos,
            "logprobs": logprobs, "include_stop_str_in_output": req.include_stop_str_in_output,
            "skip_special_tokens": req.skip_special_tokens, "structured_outputs": structured_outputs,
        }
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(req, name)
            if value is not None:
                kwargs[name] = value
        if max_tokens is not None and req.min_tokens > max_tokens:
            raise bad_request(f"min_tokens ({req.min_tokens}) must be <= max_tokens ({max_tokens})",
                              "min_tokens")
        try:
            return SamplingParams(**kwargs)
        except ValueError as exc:
            raise bad_request(str(exc), param_of_value_error(str(exc))) from exc

    # ------------------------------------------------------------------------------------- runs
    async def generate(self, prompt: PromptInput, params: SamplingParams, request_id: str, *,
                       priority: int = 0, deadline_s: float | None = None) -> AsyncIterator[Any]:
        """One engine request's outputs, with metrics; the request is aborted if the consumer stops
        early (client gone, cancellation, error)."""
        engine = self.engine
        timer = RequestTimer(self.metrics)
        kwargs: dict[str, Any] = {"priority": priority}
        if deadline_s is not None:
            kwargs["deadline"] = deadline_s
        is_finished = False
        failure: str | None = None  # "refused" (never added) or "engine" (the engine failed)
        try:
            async for out in engine.generate(prompt.token_ids, params, request_id, **kwargs):
                timer.on_output(out)
                is_finished = out.finished
                yield out
        except ValueError as exc:  # refused at add time (e.g. larger than the whole KV pool)
            failure = "refused"
            raise bad_request(str(exc), param_of_value_error(str(exc), "prompt")) from exc
        except EngineShuttingDownError as exc:
            failure = "refused"
            raise APIError(503, "Server is shutting down", code="draining", headers={"Retry-After": "1"}) from exc
        except EngineDeadError as exc:
            failure = "engine"
            raise APIError(503, f"The engine is not running: {exc}", code="engine_dead") from exc
        finally:
            if not is_finished and failure != "refused":
                timer.on_abort(by_client=failure is None and not self.lifecycle.is_draining)
            if not is_finished and failure is None:
                with anyio.CancelScope(shield=True):
                    try:
                        await engine.abort(request_id)
                    except Exception:  # noqa: BLE001 - already gone is fine
                        logger.debug("abort of %s failed", request_id, exc_info=True)

    async def run_to_end(self, prompt: PromptInput, params: SamplingParams, request_id: str, *,
                         priority: int = 0, deadline_s: float | None = None) -> tuple[Any, float | None]:
        """Run one engine request to completion; returns (final RequestOutput, ttft seconds)."""
        start = time.monotonic()
        final, ttft = None, None
        async for out in self.generate(prompt, params, request_id, priority=priority, deadline_s=deadline_s):
            if ttft is None and any(c.token_ids for c in out.outputs):
                ttft = time.monotonic() - start
            final = out
        if final is None:
            raise APIError(500, "engine returned no output", code="internal_error")
        if self.lifecycle.is_draining and any(c.finish_reason == "abort" and c.stop_reason != "deadline"
                                              for c in final.outputs):
            raise APIError(503, "Server shut down before the request finished (drain timeout)",
                           code="drain_timeout", headers={"Retry-After": "1"})
        return final, ttft

    async def run_all(self, prompts: Sequence[PromptInput], params: Sequence[SamplingParams],
                      request_ids: Sequence[str], priority: int = 0) -> list[Any]:
        """Run several engine requests concurrently; all are aborted if one fails."""
        results = await gather_or_cancel([self.run_to_end(p, sp, rid, priority=priority)
                                          for p, sp, rid in zip(prompts, params, request_ids, strict=True)])
        return [final for final, _ in results]


async def gather_or_cancel(coros: Sequence[Awaitable[T]]) -> list[T]:
    """Run these concurrently and return their results in order; when one fails (or the caller is
    cancelled), the others are cancelled and awaited before the error propagates."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
