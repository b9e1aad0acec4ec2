"""Tool calling without a server: the family parsers, the forced-call plans, and streamed deltas."""

from __future__ import annotations

import json

import pytest

from infergrid.worker.server.errors import APIError
from infergrid.worker.server.protocol import ChatCompletionRequest
from infergrid.worker.server.tool_calling import json_value_end, plan_tools, stream_required_items
from infergrid.worker.server.tool_parsers import parser_for_template
from infergrid.worker.server.tool_parsers.hermes import HermesToolParser
from infergrid.worker.server.tool_parsers.llama3_json import Llama3JsonToolParser
from infergrid.worker.server.tool_streaming import ToolCallStream
from infergrid.worker.tiny_model import CHAT_TEMPLATE, LLAMA3_TEMPLATE, QWEN_TEMPLATE

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "noop"}}]


class _Tokenizer:
    def __init__(self, template: str) -> None:
        self.chat_template = template


def request(**kwargs) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **kwargs})


def test_parser_is_chosen_by_the_chat_template():
    assert isinstance(parser_for_template(QWEN_TEMPLATE), HermesToolParser)
    assert isinstance(parser_for_template(LLAMA3_TEMPLATE), Llama3JsonToolParser)
    assert parser_for_template(CHAT_TEMPLATE) is None and parser_for_template(None) is None


def test_hermes_parser():
    p = HermesToolParser()
    text = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            '<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>')
    out = p.extract(text)
    assert out.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [("get_weather", {"city": "Paris"}), ("noop", {})]
    assert p.extract("plain answer").calls == [] and p.extract("plain answer").content == "plain answer"
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert p.extract(broken).calls == [] and p.extract(broken).content == broken
    assert p.tool_start("abc<tool_call>") == 3 and p.tool_start("abc") is None
    assert p.held_back("text <tool_") == len("<tool_") and p.held_back("text") == 0


def test_llama3_json_parser():
    p = Llama3JsonToolParser()
    out = p.extract('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "noop", '
                    '"parameters": {}}')
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [("get_weather", {"city": "Oslo"}), ("noop", {})]
    assert out.content is None
    assert p.extract("The weather is fine.").calls == []
    assert p.extract('{"name": "x", "parameters": ').calls == []  # cut short: content
    assert p.tool_start('  {"name"') == 2 and p.tool_start("Hello") is None
    assert p.held_back("  ") == 2 and p.held_back("Hi") == 0


def test_plans_check_tool_choice():
    tok = _Tokenizer(QWEN_TEMPLATE)
    assert plan_tools(request(), tok).mode == "none"
    assert plan_tools(request(tools=TOOLS), tok).mode == "auto"
    named = plan_tools(request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "noop"}}), tok)
    assert named.mode == "named" and named.constraint.json == {"type": "object"}
    required = plan_tools(request(tools=TOOLS, tool_choice="required", parallel_tool_calls=False), tok)
    schema = required.constraint.json
    assert schema["minItems"] == 1 and schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    assert required.extract('[{"name": "noop", "parameters": {}}]').calls[0].name == "noop"
    with pytest.raises(APIError, match="not in tools"):
        plan_tools(request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), tok)
    with pytest.raises(APIError, match="requires tools"):
        plan_tools(request(tool_choice="auto"), tok)
    with pytest.raises(APIError, match="tool-call format"):
        plan_tools(request(tools=TOOLS), _Tokenizer(CHAT_TEMPLATE))
    assert plan_tools(request(tools=TOOLS, tool_choice="none"), _Tokenizer(CHAT_TEMPLATE)).template_tools is None


def stream_char_by_char(stream: ToolCallStream, text: str) -> tuple[str, list[tuple[str, str]]]:
    """Feed `text` one character at a time; returns (content, [(name, arguments)]) from the deltas."""
    content, calls = "", {}
    for end in range(len(text) + 1):
        c, deltas = stream.update(text[:end], end == len(text))
        content += c
        for d in deltas:
            if "id" in d:
                assert d["index"] == len(calls) and d["type"] == "function"
                calls[d["index"]] = [d["function"]["name"], d["function"]["arguments"]]
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                calls[d["index"]][1] += d["function"]["arguments"]
    return content, [(n, a) for n, a in calls.values()]


def test_required_output_streams_as_growing_arguments():
    text = '[{"name": "get_weather", "parameters": {"city": "a}\\"b"}}, {"name": "noop", "parameters": {}}]'
    assert json_value_end(text, text.index('{"city"')) == text.index('}}, ') + 1
    final = stream_required_items(text)
    assert final == [("get_weather", '{"city": "a}\\"b"}'), ("noop", "{}")]
    stream = ToolCallStream(plan_tools(request(tools=TOOLS, tool_choice="required"), _Tokenizer(QWEN_TEMPLATE)))
    assert stream_char_by_char(stream, text) == ("", final)


@pytest.mark.parametrize("template, text, content", [
    (QWEN_TEMPLATE, 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
                    '<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>', "Sure. "),
    (LLAMA3_TEMPLATE, '{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "noop", "parameters": {}}', ""),
])
def test_auto_stream_sends_content_then_growing_calls(template, text, content):
    stream = ToolCallStream(plan_tools(request(tools=TOOLS), _Tokenizer(template)))
    assert stream_char_by_char(stream, text) == (content, [("get_weather", '{"city": "Oslo"}'), ("noop", "{}")])
    assert stream.has_tool_calls
    whole = plan_tools(request(tools=TOOLS), _Tokenizer(template)).extract(text)  # (as without streaming)
    assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == [("get_weather", {"city": "Oslo"}), ("noop", {})]


def test_auto_stream_text_that_is_no_call_ends_as_content():
    tok = _Tokenizer(QWEN_TEMPLATE)
    plain = ToolCallStream(plan_tools(request(tools=TOOLS), tok))
    assert stream_char_by_char(plain, "a <tool") == ("a <tool", []) and not plain.has_tool_calls
    broken = ToolCallStream(plan_tools(request(tools=TOOLS), tok))
    assert stream_char_by_char(broken, "x <tool_call>\n{oops}") == ("x <tool_call>\n{oops}", [])
    llama = ToolCallStream(plan_tools(request(tools=TOOLS), _Tokenizer(LLAMA3_TEMPLATE)))
    assert stream_char_by_char(llama, "  {no json") == ("  {no json", [])
