"""Tool calling on /v1/chat/completions: which tools the chat template sees, how the output is
constrained, and how tool calls are read back from the generated text.

    tool_choice   constraint (grammar)                              output text -> tool calls
    none          none (tools shown to the template if it can)      plain content
    auto          none                                              the family's parser (tool_parsers/)
    required      JSON array of {"name": <one of the tools>,        every item is a call
                  "parameters": <its schema>}, >= 1 item (1 without parallel_tool_calls)
    named         the function's parameters schema                  the text is the call's arguments

`required` and named calls are enforced by the grammar, so their output always parses, whatever the
model; `auto` relies on the model following its template's format.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from infergrid.worker.structured_output.params import StructuredOutputsParams

from .errors import bad_request
from .protocol import ChatCompletionRequest, ResponseToolCall
from .tool_parsers import ExtractedToolCalls, ParsedToolCall, ToolParser, parser_for_tokenizer

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass
class ToolPlan:
    """A chat request's tool handling (see the module docstring)."""

    mode: str  # "none" | "auto" | "required" | "named"
    template_tools: list[dict[str, Any]] | None = None
    parser: ToolParser | None = None
    named: str | None = None
    constraint: StructuredOutputsParams | None = None
    tool_names: list[str] = field(default_factory=list)

    def extract(self, text: str) -> ExtractedToolCalls:
        """The content and tool calls of a finished choice."""
        if self.mode == "named":
            return ExtractedToolCalls(None, [ParsedToolCall(self.named or "", text)])
        if self.mode == "required":
            try:
                items = json.loads(text)
            except json.JSONDecodeError:  # (cut by max_tokens or a stop string)
                return ExtractedToolCalls(text or None)
            return ExtractedToolCalls(None, [ParsedToolCall(i["name"], json.dumps(i["parameters"], ensure_ascii=False))
                                             for i in items])
        if self.mode == "auto" and self.parser is not None:
            return self.parser.extract(text)
        return ExtractedToolCalls(text)


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def response_tool_calls(calls: list[ParsedToolCall]) -> list[ResponseToolCall]:
    return [ResponseToolCall(id=new_tool_call_id(), function={"name": c.name, "arguments": c.arguments})
            for c in calls]


def plan_tools(req: ChatCompletionRequest, tokenizer: Any) -> ToolPlan:
    """Check `tools` / `tool_choice` (400 naming the problem) and plan the request's tool handling."""
    tools = req.tools or []
    choice = req.tool_choice
    if not tools:
        if choice is not None and choice != "none":
            raise bad_request("tool_choice requires tools", "tool_choice")
        return ToolPlan("none")
    names = [t.function.name for t in tools]
    duplicate = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if duplicate is not None:
        raise bad_request(f"tool names must be unique, {duplicate!r} appears twice", "tools")
    for i, t in enumerate(tools):
        if t.function.parameters is not None and t.function.parameters.get("type", "object") != "object":
            raise bad_request("a function's parameters must be a JSON schema of type object",
                              f"tools[{i}].function.parameters")
    parser = parser_for_tokenizer(tokenizer)
    template_tools = [t.model_dump(exclude_none=True) for t in tools]
    if choice == "none":
        return ToolPlan("none", template_tools if parser is not None else None, tool_names=names)
    if parser is None:
        raise bad_request("this model's chat template has no tool-call format this server can parse "
                          "(supported: Llama 3.x JSON, Qwen2.5/Qwen3 <tool_call>)", "tools",
                          code="unsupported_parameter")
    if req.response_format is not None and req.response_format.type != "text" and choice != "auto":
        raise bad_request("response_format cannot be combined with a forced tool_choice", "response_format")
    mode = "auto" if choice in (None, "auto") else "required" if choice == "required" else "named"
    plan = ToolPlan(mode, template_tools, parser, tool_names=names)
    if mode == "named":
        plan.named = choice.function.name  # type: ignore[union-attr]
        if plan.named not in names:
            raise bad_request(f"tool_choice names function {plan.named!r}, which is not in tools "
                              f"({', '.join(names)})", "tool_choice")
        params = tools[names.index(plan.named)].function.parameters
        plan.constraint = StructuredOutputsParams(json=params or _ANY_OBJECT)
    elif mode == "required":
        plan.constraint = StructuredOutputsParams(json=required_schema(req))
    return plan


def required_schema(req: ChatCompletionRequest) -> dict[str, Any]:
    """The JSON schema of `tool_choice: required` output: a list of calls of the given tools."""
    items = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                               "parameters": t.function.parameters or _ANY_OBJECT},
              "required": ["name", "parameters"], "additionalProperties": False} for t in req.tools or []]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not req.parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


_ITEM_HEADER = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:parameters|arguments)"\s*:\s*')


def stream_required_items(text: str) -> list[tuple[str, str]]:
    """(name, arguments text so far) of each call in partial text holding calls as JSON objects
    `{"name": "f", "parameters": {...}}` (or `"arguments"`: Hermes), e.g. a `required` output
    `[{...}, {...}]` or Hermes `<tool_call>` blocks: a call appears once its name is complete, and its
    arguments text only grows as more text arrives (so it can be streamed as deltas)."""
    items: list[tuple[str, str]] = []
    pos = 0
    while True:
        m = _ITEM_HEADER.search(text, pos)
        if m is None:
            return items
        start = m.end()
        end = json_value_end(text, start)
        items.append((json.loads(m.group(1)), text[start:end]))
        if end == len(text):
            return items
        pos = end


def json_value_end(text: str, start: int) -> int:
    """Index just past the JSON object or array that starts at `start` (len(text) if it is unfinished)."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)
