"""Request and response bodies of the worker's HTTP API (OpenAI-shaped, plus the seed API).

Requests are strict: ints must be JSON integers (no 1.5, no "1", no true), floats must be finite.
Unknown TOP-LEVEL fields of a request are ignored the way vLLM ignores them (routers and gateways add
their own, e.g. vllm-router's `no_stop_trim`, `return_hidden_states`, `separate_reasoning`): logged once
per field name and listed in the response's `X-Ignored-Fields` header (see middleware.py); unknown
fields inside nested objects (messages, stream_options, ...) are still refused. Limits that depend on the loaded model (max_model_len, vocabulary size)
are checked by the serving code, not here.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

# Largest seed accepted (a signed 64-bit integer, what torch generators take).
MAX_SEED = 2**63 - 1
# Most top logprobs a request may ask for (the engine's MAX_LOGPROBS).
MAX_TOP_LOGPROBS = 20
# Most choices per prompt.
MAX_N = 64

TokenId = Annotated[int, Field(ge=0)]
StopString = Annotated[str, Field(min_length=1)]
Prompt = str | list[str] | list[TokenId] | list[list[TokenId]]


class StrictModel(BaseModel):
    """Strict JSON parsing, finite floats, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# The names of unknown top-level fields ignored while parsing this request (a list the middleware puts
# in place per request and turns into the X-Ignored-Fields header).
IGNORED_FIELDS: ContextVar[list[str] | None] = ContextVar("infergrid_ignored_fields", default=None)
_logged_ignored: set[str] = set()


class RequestModel(StrictModel):
    """A request body: strict, but unknown top-level fields are dropped (logged once per name)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _drop_unknown_fields(self) -> RequestModel:
        extra = self.__pydantic_extra__
        if extra:
            names = sorted(extra)
            for name in names:
                if name not in _logged_ignored:
                    _logged_ignored.add(name)
                    log.warning("ignoring unknown request field %r (logged once per field name)", name[:100])
            if (ignored := IGNORED_FIELDS.get()) is not None:
                ignored.extend(n for n in names if n not in ignored)
            extra.clear()
        return self


class ResponseModel(BaseModel):
    """Response bodies (documented in the OpenAPI schema, serialised as-is)."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------------------- sampling
class GuidedOptions(StrictModel):
    """vLLM's `structured_outputs` object: one of json, regex, choice, grammar, json_object."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1)
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, min_length=1)
    json_object: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)


class SamplingFields(StrictModel):
    """Sampling knobs shared by /v1/completions, /v1/chat/completions and /v1/generate."""

    temperature: float | None = Field(None, ge=0.0, description="0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0 = off")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    seed: int | None = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
    stop: StopString | list[StopString] | None = None
    stop_token_ids: list[TokenId] | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1, description="lower runs first")
    # Structured output, vLLM's extra fields (at most one; response_format is the OpenAI way).
    guided_json: dict[str, Any] | str | None = Field(None, description="a JSON schema the output follows")
    guided_regex: str | None = Field(None, min_length=1, description="a regex the output matches")
    guided_choice: list[str] | None = Field(None, min_length=1, description="the output is one of these")
    guided_grammar: str | None = Field(None, min_length=1, description="an EBNF grammar (xgrammar's dialect)")
    guided_whitespace_pattern: str | None = Field(None, description="not supported; must be null")
    structured_outputs: GuidedOptions | None = Field(None, description="vLLM's newer spelling of guided_*")


class StreamOptions(StrictModel):
    """`stream_options` of the OpenAI API."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


# ------------------------------------------------------------------------------------- completions
class CompletionRequest(SamplingFields, RequestModel):
    """POST /v1/completions."""

    model: str | None = None
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="must equal n if given")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = Field(None, description="not supported; must be null or empty")
    logit_bias: dict[str, float] | None = Field(None, description="not supported; must be null or empty")
    user: str | None = None


class CompletionLogprobs(ResponseModel):
    """Legacy completions logprobs."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(ResponseModel):
    """One choice of a completion."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class PromptTokensDetails(ResponseModel):
    """Prompt token breakdown."""

    cached_tokens: int = 0


class Usage(ResponseModel):
    """Token counts of a request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionResponse(ResponseModel):
    """Non-streaming /v1/completions answer (streaming chunks share the shape)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# -------------------------------------------------------------------------------------------- chat
class ContentPart(StrictModel):
    """A text part of a message (images and audio are not supported)."""

    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    """One message of the conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None


class JsonSchemaFormat(StrictModel):
    """`response_format.json_schema`: a named JSON schema (`strict` is always enforced here)."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)


class ResponseFormat(StrictModel):
    """`text`, `json_object` (any JSON object) or `json_schema` (the output follows the schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionCall(StrictModel):
    """A function call in an assistant message of the conversation (arguments: JSON text)."""

    name: str
    arguments: str


class ToolCall(StrictModel):
    """A tool call in an assistant message of the conversation."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(StrictModel):
    """A callable function: its name, description and JSON schema of its arguments."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(StrictModel):
    """One tool the model may call."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    """`tool_choice.function`."""

    name: str


class NamedToolChoice(StrictModel):
    """`tool_choice` forcing one function."""

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields, RequestModel):
    """POST /v1/chat/completions."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: up to max_model_len")
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, none without")
    parallel_tool_calls: bool = True
    logit_bias: dict[str, float] | None = Field(None, description="not supported; must be null or empty")
    user: str | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class TopLogprob(ResponseModel):
    """An alternative token and its logprob."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """The sampled token, its logprob and the top alternatives."""

    top_logprobs: list[TopLogprob] = []


class ChatChoiceLogprobs(ResponseModel):
    """Chat logprobs."""

    content: list[TokenLogprob] | None = None


class ResponseFunctionCall(ResponseModel):
    """A generated function call: name and arguments (JSON text)."""

    name: str
    arguments: str


class ResponseToolCall(ResponseModel):
    """A generated tool call."""

    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(ResponseModel):
    """The generated message (content, or tool calls, or both)."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(ResponseModel):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(ResponseModel):
    """Non-streaming /v1/chat/completions answer."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


# ------------------------------------------------------------------------------------------ models
class ModelCard(ResponseModel):
    """One served model."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "infergrid"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(ResponseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------- errors
class ErrorDetail(ResponseModel):
    """OpenAI error object."""

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(ResponseModel):
    """`{"error": {...}}`."""

    error: ErrorDetail
