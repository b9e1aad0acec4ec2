"""POST /v1/chat/completions: the checkpoint's chat template, plain and streaming."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response

from infergrid.worker.sampling_params import SamplingParams
from infergrid.worker.tokenizer import apply_chat_template

from .errors import bad_request
from .logprobs import LogprobFormatter
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    Usage,
)
from .serving_base import PromptInput, ServingBase
from .serving_completions import usage_of
from .streaming import SSE_DONE, EventStreamResponse, aclose_quietly, prime, sse_error, sse_event


def message_dict(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it (content always a string)."""
    content = message.content
    if isinstance(content, list):
        content = "\n".join(part.text for part in content)
    out: dict[str, Any] = {"role": message.role, "content": content or ""}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


class OpenAIServingChat(ServingBase):
    """The chat completions API over the engine."""

    def render(self, req: ChatCompletionRequest) -> PromptInput:
        """Apply the chat template; template problems are the request's fault (400)."""
        if req.continue_final_message and req.add_generation_prompt:
            raise bad_request("continue_final_message requires add_generation_prompt=false",
                              "continue_final_message")
        if req.continue_final_message and req.messages[-1].role != "assistant":
            raise bad_request("continue_final_message needs a final assistant message", "messages")
        messages = [message_dict(m) for m in req.messages]
        kwargs = {"continue_final_message": True} if req.continue_final_message else {}
        try:
            ids = apply_chat_template(self.tokenizer, messages, add_generation_prompt=req.add_generation_prompt,
                                      **kwargs)
        except Exception as exc:  # noqa: BLE001 - jinja/template errors come from the messages
            raise bad_request(f"could not apply the chat template: {exc}", "messages") from exc
        if not ids:
            raise bad_request("the rendered conversation has no tokens", "messages")
        return PromptInput(ids)

    def prepare(self, req: ChatCompletionRequest) -> tuple[PromptInput, SamplingParams]:
        """All checks that need no engine work; 4xx on the first problem."""
        self.check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        prompt = self.render(req)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        self.check_length(prompt, max_tokens, "messages", param)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return prompt, self.sampling_params(req, max_tokens=max_tokens, n=req.n, logprobs=logprobs)

    async def create(self, req: ChatCompletionRequest) -> ChatCompletionResponse | Response:
        """Answer one chat completions request."""
        prompt, params = self.prepare(req)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.admission.acquire(req.n)  # the engine runs n sequences
        if req.stream:
            return await self._stream(req, prompt, params, request_id)
        try:
            (final,) = await self.run_all([prompt], [params], [request_id], priority=req.priority)
        finally:
            self.admission.release(req.n)
        fmt = LogprobFormatter(self.tokenizer)
        choices = []
        for c in final.outputs:
            logprobs = None
            if req.logprobs:
                logprobs = ChatChoiceLogprobs(content=fmt.chat(c.token_ids, c.logprobs, req.top_logprobs or 0))
            choices.append(ChatChoice(index=c.index, message=AssistantMessage(content=c.text), logprobs=logprobs,
                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                      usage=usage_of([final]))

    async def _stream(self, req: ChatCompletionRequest, prompt: PromptInput, params: SamplingParams,
                      request_id: str) -> Response:
        raw = self.generate(prompt, params, request_id, priority=req.priority)
        try:
            (stream,) = await prime([raw])
        except BaseException:
            self.admission.release(req.n)
            raise

        async def on_close() -> None:
            await aclose_quietly(stream)
            await aclose_quietly(raw)
            self.admission.release(req.n)

        return EventStreamResponse(self._events(req, stream, request_id), on_close)

    async def _events(self, req: ChatCompletionRequest, stream: AsyncIterator[Any],
                      request_id: str) -> AsyncIterator[str]:
        created = int(time.time())
        fmt = LogprobFormatter(self.tokenizer)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        num_sent: dict[int, int] = {}
        final = None

        def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
            body: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                                    "model": self.model_name, "choices": choices}
            if usage is not None or include_usage:
                body["usage"] = usage.model_dump() if usage is not None else None
            return sse_event(body)

        try:
            yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for j in range(req.n)])
            async for out in stream:
                final = out
                choices = []
                for c in out.outputs:
                    start = num_sent.get(c.index, 0)
                    new_ids = c.token_ids[start:]
                    if not c.delta_text and not new_ids and c.finish_reason is None:
                        continue
                    logprobs = None
                    if req.logprobs:
                        content = fmt.chat(new_ids, (c.logprobs or [])[start:], req.top_logprobs or 0)
                        logprobs = {"content": [t.model_dump() for t in content]}
                    num_sent[c.index] = len(c.token_ids)
                    delta = {"content": c.delta_text} if c.delta_text else {}
                    choices.append({"index": c.index, "delta": delta, "logprobs": logprobs,
                                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
                if choices:
                    yield chunk(choices, usage_of([final]) if continuous else None)
            if include_usage and final is not None:
                yield chunk([], usage_of([final]))
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band
            yield sse_error(exc)
        yield SSE_DONE
