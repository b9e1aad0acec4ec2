"""What a tool-call parser does: find the tool calls in a model's text (whole, or as it streams)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ParsedToolCall:
    """One call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


@dataclass
class ExtractedToolCalls:
    """A message split into its text content (None when empty) and its tool calls."""

    content: str | None
    calls: list[ParsedToolCall] = field(default_factory=list)


def arguments_text(arguments: Any) -> str:
    """A call's arguments as compact JSON text (a JSON string of an object is kept as it is)."""
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
            return arguments
        except json.JSONDecodeError:
            return json.dumps(arguments)
    return json.dumps({} if arguments is None else arguments, ensure_ascii=False)


class ToolParser:
    """A model family's tool-call format. Subclasses set `name` and implement `extract` and
    `tool_start` (streaming: where the calls begin, so that text before them streams as content)."""

    name = ""

    def extract(self, text: str) -> ExtractedToolCalls:
        """The content and tool calls of a finished message; a malformed call stays content."""
        raise NotImplementedError

    def tool_start(self, text: str) -> int | None:
        """Index in a (partial) message where its tool calls start; None when none started yet."""
        raise NotImplementedError

    def held_back(self, text: str) -> int:
        """How many trailing characters of a partial message could be the start of a tool call's
        marker and must not stream as content yet."""
        return 0
