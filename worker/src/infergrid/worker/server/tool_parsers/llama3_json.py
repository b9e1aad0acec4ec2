"""Llama 3.x JSON tool calls: the whole message is `{"name": ..., "parameters": {...}}` (after an
optional `<|python_tag|>`), several calls separated by `;`."""

from __future__ import annotations

import json

from .base import ExtractedToolCalls, ParsedToolCall, ToolParser, arguments_text

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    """A message that starts with `{` is a list of calls; anything that does not parse is content."""

    name = "llama3_json"

    def extract(self, text: str) -> ExtractedToolCalls:
        body = text.strip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):].lstrip()
        if not body.startswith("{"):
            return ExtractedToolCalls(text or None)
        decoder = json.JSONDecoder()
        calls, pos = [], 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return ExtractedToolCalls(text or None)
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return ExtractedToolCalls(text or None)
            calls.append(ParsedToolCall(obj["name"], arguments_text(obj.get("parameters", obj.get("arguments")))))
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return ExtractedToolCalls(None, calls)

    def tool_start(self, text: str) -> int | None:
        body = text.lstrip()
        if body.startswith(("{", PYTHON_TAG)):
            return len(text) - len(body)
        return None

    def held_back(self, text: str) -> int:
        body = text.lstrip()
        # (nothing but whitespace or the start of the python tag yet: the message may still be a call)
        return len(text) if not body or PYTHON_TAG.startswith(body) else 0
