"""POST /v1/completions (plain and streaming)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.responses import Response

from infergrid.worker.sampling_params import SamplingParams

from .errors import bad_request
from .logprobs import LogprobFormatter
from .protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    Usage,
)
from .serving_base import PromptInput, ServingBase
from .streaming import (
    SSE_DONE,
    EventStreamResponse,
    aclose_quietly,
    merge_streams,
    prime,
    sse_error,
    sse_event,
)
from .structured import compile_grammar, structured_outputs_of

# Most prompts in one /v1/completions request.
MAX_PROMPTS = 256


def usage_of(finals: Sequence[Any]) -> Usage:
    """Token counts over the final RequestOutputs of one HTTP request."""
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    cached = sum(int(o.num_cached_tokens or 0) for o in finals)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class OpenAIServingCompletion(ServingBase):
    """The legacy completions API over the engine."""

    def parse_prompts(self, prompt: Any) -> list[PromptInput]:
        """str | list[str] | list[int] | list[list[int]] -> PromptInputs."""
        if isinstance(prompt, str):
            return [self.prompt_from_text(prompt, "prompt")]
        if not prompt:
            raise bad_request("'prompt' must not be empty", "prompt")
        if len(prompt) > MAX_PROMPTS and not isinstance(prompt[0], int):
            raise bad_request(f"at most {MAX_PROMPTS} prompts per request", "prompt")
        if isinstance(prompt[0], int):
            return [self.prompt_from_ids(prompt, "prompt")]
        if isinstance(prompt[0], str):
            return [self.prompt_from_text(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        return [self.prompt_from_ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)]

    def prepare(self, req: CompletionRequest) -> tuple[list[PromptInput], SamplingParams]:
        """All checks that need no engine work; 4xx on the first problem."""
        self.check_model(req.model)
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix", code="unsupported_parameter")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of must equal n (best-of sampling is not supported)", "best_of",
                              code="unsupported_parameter")
        if req.echo and req.logprobs is not None:
            raise bad_request("echo together with logprobs is not supported (no prompt logprobs)", "echo",
                              code="unsupported_parameter")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        prompts = self.parse_prompts(req.prompt)
        for i, p in enumerate(prompts):
            self.check_length(p, req.max_tokens, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
        constraint, _ = structured_outputs_of(req)
        params = self.sampling_params(req, max_tokens=req.max_tokens, n=req.n, logprobs=req.logprobs,
                                      structured_outputs=constraint)
        return prompts, params

    async def create(self, req: CompletionRequest) -> CompletionResponse | Response:
        """Answer one completions request."""
        prompts, params = self.prepare(req)
        if params.structured_outputs is not None:
            await compile_grammar(self.engine, params.structured_outputs, structured_outputs_of(req)[1], self.metrics)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        weight = len(prompts) * req.n  # the engine runs n sequences per prompt
        self.admission.acquire(weight)
        if req.stream:
            return await self._stream(req, prompts, params, request_id, ids, weight)
        try:
            finals = await self.run_all(prompts, [params] * len(prompts), ids, priority=req.priority)
        finally:
            self.admission.release(weight)
        fmt = LogprobFormatter(self.tokenizer)
        choices = []
        for i, (prompt, out) in enumerate(zip(prompts, finals, strict=True)):
            prefix = self._echo_text(prompt) if req.echo else ""
            for c in out.outputs:
                logprobs = None
                if req.logprobs is not None:
                    logprobs = fmt.completion(c.token_ids, c.logprobs, req.logprobs, len(prefix))
                choices.append(CompletionChoice(index=i * req.n + c.index, text=prefix + c.text, logprobs=logprobs,
                                                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage_of(finals))

    def _echo_text(self, prompt: PromptInput) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.token_ids, skip_special_tokens=True)

    async def _stream(self, req: CompletionRequest, prompts: list[PromptInput], params: SamplingParams,
                      request_id: str, ids: list[str], weight: int) -> Response:
        raw = [self.generate(p, params, rid, priority=req.priority) for p, rid in zip(prompts, ids, strict=True)]
        try:
            streams = await prime(raw)
        except BaseException:
            self.admission.release(weight)
            raise

        async def on_close() -> None:
            for s in [*streams, *raw]:
                await aclose_quietly(s)
            self.admission.release(weight)

        return EventStreamResponse(self._events(req, prompts, streams, request_id), on_close)

    async def _events(self, req: CompletionRequest, prompts: list[PromptInput],
                      streams: list[AsyncIterator[Any]], request_id: str) -> AsyncIterator[str]:
        created = int(time.time())
        fmt = LogprobFormatter(self.tokenizer)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        num_sent: dict[tuple[int, int], int] = {}  # (prompt, choice) -> tokens streamed
        offsets: dict[tuple[int, int], int] = {}
        finals: dict[int, Any] = {}

        def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
            body: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": created,
                                    "model": self.model_name, "choices": choices}
            if usage is not None or include_usage:
                body["usage"] = usage.model_dump() if usage is not None else None
            return sse_event(body)

        try:
            if req.echo:
                for i, p in enumerate(prompts):
                    text = self._echo_text(p)
                    for j in range(req.n):
                        offsets[(i, j)] = len(text)
                        yield chunk([{"index": i * req.n + j, "text": text, "logprobs": None,
                                      "finish_reason": None}])
            async for i, out in merge_streams(streams):
                finals[i] = out
                choices = []
                for c in out.outputs:
                    key = (i, c.index)
                    start = num_sent.get(key, 0)
                    new_ids = c.token_ids[start:]
                    if not c.delta_text and not new_ids and c.finish_reason is None:
                        continue
                    logprobs = None
                    if req.logprobs is not None:
                        lp = fmt.completion(new_ids, (c.logprobs or [])[start:], req.logprobs, offsets.get(key, 0))
                        logprobs = lp.model_dump()
                    num_sent[key] = len(c.token_ids)
                    offsets[key] = offsets.get(key, 0) + len(c.delta_text)
                    choices.append({"index": i * req.n + c.index, "text": c.delta_text, "logprobs": logprobs,
                                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
                if choices:
                    yield chunk(choices, usage_of(list(finals.values())) if continuous else None)
            if include_usage:
                yield chunk([], usage_of(list(finals.values())))
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band
            yield sse_error(exc)
        yield SSE_DONE
