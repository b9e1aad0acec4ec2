"""Streaming a chat choice with tools: the growing text -> content deltas and OpenAI tool-call deltas
(`delta.tool_calls[i]`: first with id, type and name, then `function.arguments` pieces)."""

from __future__ import annotations

from typing import Any

from .tool_calling import ToolPlan, new_tool_call_id, stream_required_items


class ToolCallStream:
    """One choice's stream state. `update(text, finished)` takes the choice's whole text so far and
    returns (content delta, tool-call deltas)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.num_content_chars = 0
        self.calls: list[list[Any]] = []  # [id, name, chars of arguments sent]
        self.in_tool_calls = False
        self.tool_start = 0  # where the tool calls start in the text (auto)

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.calls)

    def update(self, text: str, finished: bool) -> tuple[str, list[dict[str, Any]]]:
        mode = self.plan.mode
        if mode == "named":
            return "", self._arguments_deltas([(self.plan.named or "", text)])
        if mode == "required":
            return "", self._arguments_deltas(stream_required_items(text))
        if mode != "auto" or self.plan.parser is None:
            return self._content(text, len(text)), []
        parser = self.plan.parser
        if not self.in_tool_calls:
            start = parser.tool_start(text)
            if start is None:
                return self._content(text, len(text) if finished else len(text) - parser.held_back(text)), []
            content = self._content(text, start)
            self.in_tool_calls, self.tool_start = True, start
        else:
            content = ""
        # Calls stream as soon as their name is known, their arguments as they grow (the model's own
        # JSON text); what the parser would not take as a call is content once the choice ends.
        deltas = self._arguments_deltas(stream_required_items(text[self.tool_start:]))
        if finished and not self.calls and not parser.extract(text).calls:
            content += self._content(text, len(text))
        return content, deltas

    def _content(self, text: str, end: int) -> str:
        if end <= self.num_content_chars:
            return ""
        delta = text[self.num_content_chars:end]
        self.num_content_chars = end
        return delta

    def _arguments_deltas(self, items: list[tuple[str, str]]) -> list[dict[str, Any]]:
        deltas = []
        for index, (name, arguments) in enumerate(items):
            if index == len(self.calls):
                self.calls.append([new_tool_call_id(), name, len(arguments)])
                deltas.append({"index": index, "id": self.calls[index][0], "type": "function",
                               "function": {"name": name, "arguments": arguments}})
                continue
            sent = self.calls[index][2]
            if len(arguments) > sent:
                self.calls[index][2] = len(arguments)
                deltas.append({"index": index, "function": {"arguments": arguments[sent:]}})
        return deltas
