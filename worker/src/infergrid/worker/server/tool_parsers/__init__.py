"""Tool-call parsers, chosen by the model's chat template (its family's tool-call format)."""

from __future__ import annotations

from typing import Any

from .base import ExtractedToolCalls, ParsedToolCall, ToolParser
from .hermes import HermesToolParser
from .llama3_json import Llama3JsonToolParser

__all__ = ["ExtractedToolCalls", "ParsedToolCall", "ToolParser", "parser_for_template", "parser_for_tokenizer"]


def parser_for_template(template: str | None) -> ToolParser | None:
    """The parser of a chat template's tool-call format: Hermes `<tool_call>` blocks (Qwen2.5/Qwen3),
    Llama 3.x JSON (a Llama 3 header template that renders `tools`); None for a template without
    tool calls."""
    if not template:
        return None
    if "<tool_call>" in template:
        return HermesToolParser()
    if "<|start_header_id|>" in template and "tools" in template:
        return Llama3JsonToolParser()
    return None


def parser_for_tokenizer(tokenizer: Any) -> ToolParser | None:
    """parser_for_template of the tokenizer's chat template (a dict of named templates: "tool_use" first)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return parser_for_template(template)
