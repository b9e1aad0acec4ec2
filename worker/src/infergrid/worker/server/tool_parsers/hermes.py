"""Hermes-style tool calls (Qwen2.5, Qwen3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
one block per call, optionally after some text."""

from __future__ import annotations

import json
import re

from .base import ExtractedToolCalls, ParsedToolCall, ToolParser, arguments_text

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class HermesToolParser(ToolParser):
    """`<tool_call>` JSON blocks; a block whose JSON does not parse keeps the whole text as content."""

    name = "hermes"

    def extract(self, text: str) -> ExtractedToolCalls:
        start = text.find(START)
        if start < 0:
            return ExtractedToolCalls(text or None)
        calls = []
        for block in _BLOCK.findall(text[start:]):
            try:
                obj = json.loads(block)
            except json.JSONDecodeError:
                return ExtractedToolCalls(text or None)
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return ExtractedToolCalls(text or None)
            calls.append(ParsedToolCall(obj["name"], arguments_text(obj.get("arguments", obj.get("parameters")))))
        content = text[:start].strip()
        return ExtractedToolCalls(content or None, calls)

    def tool_start(self, text: str) -> int | None:
        index = text.find(START)
        return None if index < 0 else index

    def held_back(self, text: str) -> int:
        for n in range(min(len(START) - 1, len(text)), 0, -1):
            if START.startswith(text[-n:]):
                return n
        return 0
