"""POST /v1/chat/completions: the checkpoint's chat template, plain and streaming, with structured
output (response_format, guided_*) and tool calling (tool_calling.py, tool_parsers/)."""

from __future__ import annotations

import json
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
from .structured import compile_grammar, structured_outputs_of
from .tool_calling import ToolPlan, plan_tools, response_tool_calls
from .tool_streaming import ToolCallStream


def message_dict(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it (content always a string; tool call arguments as objects,
    as the Llama 3.x and Qwen templates render them with `tojson`)."""
    content = message.content
    if isinstance(content, list):
        content = "\n".join(part.text for part in content)
    out: dict[str, Any] = {"role": message.role, "content": content or ""}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = [{"id": tc.id, "type": "function",
                              "function": {"name": tc.function.name, "arguments": _arguments(tc.function.arguments)}}
                             for tc in message.tool_calls]
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def finish_reason_of(reason: str | None, has_tool_calls: bool) -> str | None:
    """"tool_calls" for a choice that ended normally with tool calls."""
    return "tool_calls" if has_tool_calls and reason == "stop" else reason


class OpenAIServingChat(ServingBase):
    """The chat completions API over the engine."""

    def render(self, req: ChatCompletionRequest, tools: list[dict[str, Any]] | None = None) -> PromptInput:
        """Apply the chat template; template problems are the request's fault (400)."""
        if req.continue_final_message and req.add_generation_prompt:
            raise bad_request("continue_final_message requires add_generation_prompt=false",
                              "continue_final_message")
        if req.continue_final_message and req.messages[-1].role != "assistant":
            raise bad_request("continue_final_message needs a final assistant message", "messages")
        messages = [message_dict(m) for m in req.messages]
        kwargs: dict[str, Any] = {"continue_final_message": True} if req.continue_final_message else {}
        if tools:
            kwargs["tools"] = tools
        try:
            ids = apply_chat_template(self.tokenizer, messages, add_generation_prompt=req.add_generation_prompt,
                                      **kwargs)
        except Exception as exc:  # noqa: BLE001 - jinja/template errors come from the messages
            raise bad_request(f"could not apply the chat template: {exc}", "messages") from exc
        if not ids:
            raise bad_request("the rendered conversation has no tokens", "messages")
        return PromptInput(ids)

    def prepare(self, req: ChatCompletionRequest) -> tuple[PromptInput, SamplingParams, ToolPlan, str]:
        """All checks that need no engine work; 4xx on the first problem. Returns the prompt, the
        sampling params, the tool plan and the request field that set the output constraint."""
        self.check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        plan = plan_tools(req, self.tokenizer)
        constraint, field = structured_outputs_of(req, req.response_format)
        if plan.constraint is not None:
            if constraint is not None:
                raise bad_request(f"{field} cannot be combined with a forced tool_choice", field)
            constraint, field = plan.constraint, "tools"
        prompt = self.render(req, plan.template_tools)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        self.check_length(prompt, max_tokens, "messages", param)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(req, max_tokens=max_tokens, n=req.n, logprobs=logprobs,
                                      structured_outputs=constraint)
        return prompt, params, plan, field

    async def create(self, req: ChatCompletionRequest) -> ChatCompletionResponse | Response:
        """Answer one chat completions request."""
        prompt, params, plan, field = self.prepare(req)
        if params.structured_outputs is not None:
            await compile_grammar(self.engine, params.structured_outputs, field, self.metrics)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.admission.acquire(req.n)  # the engine runs n sequences
        if req.stream:
            return await self._stream(req, prompt, params, request_id, plan)
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
            message = AssistantMessage(content=c.text)
            if plan.mode != "none":
                extracted = plan.extract(c.text)
                message = AssistantMessage(content=extracted.content,
                                           tool_calls=response_tool_calls(extracted.calls) or None)
            choices.append(ChatChoice(index=c.index, message=message, logprobs=logprobs,
                                      finish_reason=finish_reason_of(c.finish_reason, bool(message.tool_calls)),
                                      stop_reason=c.stop_reason))
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                      usage=usage_of([final]))

    async def _stream(self, req: ChatCompletionRequest, prompt: PromptInput, params: SamplingParams,
                      request_id: str, plan: ToolPlan) -> Response:
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

        return EventStreamResponse(self._events(req, stream, request_id, plan), on_close)

    async def _events(self, req: ChatCompletionRequest, stream: AsyncIterator[Any],
                      request_id: str, plan: ToolPlan) -> AsyncIterator[str]:
        created = int(time.time())
        fmt = LogprobFormatter(self.tokenizer)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        num_sent: dict[int, int] = {}
        tool_streams = {j: ToolCallStream(plan) for j in range(req.n)} if plan.mode != "none" else {}
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
                    delta: dict[str, Any] = {"content": c.delta_text} if c.delta_text else {}
                    finish_reason = c.finish_reason
                    tools = tool_streams.get(c.index)
                    if tools is not None:
                        content, calls = tools.update(c.text, c.finish_reason is not None)
                        delta = {"content": content} if content else {}
                        if calls:
                            delta["tool_calls"] = calls
                        finish_reason = finish_reason_of(finish_reason, tools.has_tool_calls)
                    choices.append({"index": c.index, "delta": delta, "logprobs": logprobs,
                                    "finish_reason": finish_reason, "stop_reason": c.stop_reason})
                if choices:
                    yield chunk(choices, usage_of([final]) if continuous else None)
            if include_usage and final is not None:
                yield chunk([], usage_of([final]))
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band
            yield sse_error(exc)
        yield SSE_DONE
