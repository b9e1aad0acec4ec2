"""Structured output and tool calling over HTTP with the official `openai` client, on tiny random
models whose chat templates and tokens look like Llama 3.x and Qwen2.5 (random weights: only the
grammar makes the output parse)."""

from __future__ import annotations

import asyncio
import enum
import json
import subprocess
import uuid
from pathlib import Path

import httpx
import jsonschema
import openai
import pydantic
import pytest
from server_harness import API_KEY, MODEL_NAME, WorkerServer, worker_command

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 16},
        "status": {"enum": ["open", "closed", "stale"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "labels": {"type": "array", "items": {"enum": ["bug", "docs", "perf"]}, "maxItems": 3},
        "owner": {"type": "object",
                  "properties": {"name": {"type": "string", "maxLength": 10},
                                 "teams": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                           "maxItems": 2}},
                  "required": ["name", "teams"], "additionalProperties": False},
        "done": {"type": "boolean"},
    },
    "required": ["title", "status", "priority", "labels", "owner", "done"],
    "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["c", "f"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit", "days"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
        "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SERVE_ARGS = ("--max-model-len", "1024", "--max-num-seqs", "32", "--num-gpu-blocks-override", "2400",
              "--max-queue-size", "256")


def _make_model(root: Path, arch: str, chat_format: str) -> Path:
    out = root / f"tiny-{arch}-{chat_format}"
    subprocess.run([*worker_command(), "make-tiny-model", str(out), "--arch", arch, "--chat-format", chat_format],
                   check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory):
    """A Qwen2.5-style server and a Llama 3-style one with n-gram speculation (started together)."""
    root = tmp_path_factory.mktemp("structured")
    qwen = WorkerServer(_make_model(root, "qwen2", "qwen2.5"), root, extra_args=SERVE_ARGS, name="qwen")
    llama = WorkerServer(_make_model(root, "llama", "llama3"), root, name="llama3", extra_args=(
        *SERVE_ARGS, "--speculative-method", "ngram", "--num-speculative-tokens", "3"))
    try:
        qwen.wait_ready()
        llama.wait_ready()
        yield {"qwen": qwen, "llama3": llama}
    finally:
        qwen.stop(timeout=30)
        llama.stop(timeout=30)


def _client(server: WorkerServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300.0)


class Status(enum.StrEnum):
    open = "open"
    closed = "closed"


class Owner(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    tags: list[str] = pydantic.Field(max_length=2)


class Ticket(pydantic.BaseModel):
    title: str = pydantic.Field(max_length=12)
    status: Status
    owner: Owner
    votes: list[bool] = pydantic.Field(max_length=3)


def test_parse_returns_a_pydantic_object(servers):
    out = _client(servers["qwen"]).chat.completions.parse(model=MODEL_NAME, messages=MESSAGES, response_format=Ticket,
                                                          temperature=1.0, max_tokens=600)
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Ticket)
    assert choice.message.parsed == Ticket.model_validate_json(choice.message.content)


def test_json_schema_obeyed_over_200_sampled_requests(servers):
    server = servers["qwen"]
    fmt = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": SCHEMA, "strict": True}}

    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=600.0)
        try:
            return await asyncio.gather(*[
                client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": f"ticket {i}"}],
                                               response_format=fmt, temperature=1.0, max_tokens=600)
                for i in range(200)])
        finally:
            await client.close()

    outs = asyncio.run(run())
    texts = [o.choices[0].message.content for o in outs]
    assert [o.choices[0].finish_reason for o in outs] == ["stop"] * 200, texts
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 150  # sampled: the outputs differ


@pytest.mark.parametrize("name", ["qwen", "llama3"])
def test_streamed_json_schema_with_n_samples(servers, name):
    fmt = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": SCHEMA}}
    stream = _client(servers[name]).chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, response_format=fmt, temperature=1.0, max_tokens=600, n=3, stream=True)
    texts, finish = ["", "", ""], [None, None, None]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert finish == ["stop"] * 3
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_guided_regex_choice_grammar_and_json_object(servers):
    client = _client(servers["llama3"])  # (with n-gram speculation)
    cases = [({"guided_regex": r"[A-Z]{2}-[0-9]{4}"}, lambda t: len(t) == 7 and t[2] == "-"),
             ({"guided_choice": ["alpha", "beta", "gamma"]}, lambda t: t in ("alpha", "beta", "gamma")),
             ({"guided_grammar": 'root ::= "<" [0-9] [0-9]? [0-9]? ">"'}, lambda t: t[0] == "<" and t[-1] == ">" and t[1:-1].isdigit()),
             ({"structured_outputs": {"choice": ["on", "off"]}}, lambda t: t in ("on", "off"))]
    for extra, check in cases:
        out = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=1.0, max_tokens=40,
                                             n=4, extra_body=extra)
        for c in out.choices:
            assert c.finish_reason == "stop" and check(c.message.content), (extra, c.message.content)
    comp = client.completions.create(model=MODEL_NAME, prompt="A ticket:", temperature=1.0, max_tokens=600,
                                     extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(comp.choices[0].text), SCHEMA)
    obj = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0.0, max_tokens=600,
                                         response_format={"type": "json_object"})
    assert obj.choices[0].message.content.startswith("{")


def _check_calls(calls: list[tuple[str, str]], allowed: set[str]) -> None:
    assert calls
    for name, arguments in calls:
        assert name in allowed
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def _streamed_calls(stream) -> tuple[list[tuple[str, str]], str | None, str]:
    calls: dict[int, list] = {}
    finish, content = None, ""
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, [None, "", None])
                if d.id:
                    assert entry[2] is None  # the id (and name) come once, in the call's first delta
                    entry[2] = d.id
                if d.function and d.function.name:
                    entry[0] = d.function.name
                entry[1] += (d.function.arguments or "") if d.function else ""
            finish = c.finish_reason or finish
    assert all(e[2] for e in calls.values())
    return [(e[0], e[1]) for _, e in sorted(calls.items())], finish, content


@pytest.mark.parametrize("name", ["qwen", "llama3"])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_calls_always_parse(servers, name, choice):
    """One call (a named function, or `required` without parallel calls): its grammar is bounded, so
    every sample completes and parses. (Parallel calls: the next test.)"""
    client = _client(servers[name])
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "get_weather"}}
    allowed = {"get_weather"} if choice == "named" else set(SCHEMAS)
    for _ in range(4):
        out = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
                                             temperature=1.0, max_tokens=400, n=2, parallel_tool_calls=False)
        for c in out.choices:
            assert c.finish_reason == "tool_calls" and c.message.content is None
            assert len({tc.id for tc in c.message.tool_calls}) == len(c.message.tool_calls)
            _check_calls([(tc.function.name, tc.function.arguments) for tc in c.message.tool_calls], allowed)
        stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
                                                temperature=1.0, max_tokens=400, stream=True, parallel_tool_calls=False)
        calls, finish, content = _streamed_calls(stream)
        assert finish == "tool_calls" and content == "" and len(calls) == 1
        _check_calls(calls, allowed)


@pytest.mark.parametrize("name", ["qwen", "llama3"])
def test_parallel_required_calls_parse_streamed_and_not(servers, name):
    """Parallel calls: the list has no length limit, so a random model could run out of max_tokens;
    seeded samples (known to end within it) make this exact, streamed and not."""
    client = _client(servers[name])
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=1.0,
                  max_tokens=430)
    num_calls = []
    for seed in range(16):
        out = client.chat.completions.create(**kwargs, seed=seed)
        c = out.choices[0]
        assert c.finish_reason == "tool_calls"
        calls = [(tc.function.name, tc.function.arguments) for tc in c.message.tool_calls]
        _check_calls(calls, set(SCHEMAS))
        streamed, finish, content = _streamed_calls(client.chat.completions.create(**kwargs, seed=seed, stream=True))
        assert (streamed, finish, content) == (calls, "tool_calls", "")  # same sample, same calls
        num_calls.append(len(calls))
    assert max(num_calls) >= 2


def test_parallel_tool_calls_off_gives_one_call(servers):
    client = _client(servers["qwen"])
    for _ in range(3):
        out = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=False, temperature=1.0, max_tokens=300)
        assert len(out.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize("name", ["qwen", "llama3"])
def test_tool_results_in_the_conversation_reach_the_template(servers, name):
    server = servers[name]
    history = [*MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c", "days": 1}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}]
    client = _client(server)
    with_history = client.chat.completions.create(model=MODEL_NAME, messages=history, tools=TOOLS, max_tokens=5,
                                                  temperature=0.0)
    without = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=5,
                                             temperature=0.0)
    # the call and its result are rendered: at least their text's worth of tokens more
    extra = len('{"city": "Paris", "unit": "c", "days": 1}21 degrees and sunny get_weather')
    assert with_history.usage.prompt_tokens >= without.usage.prompt_tokens + extra // 2
    assert with_history.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_bad_inputs_are_400s(servers, server: WorkerServer):
    cases = [
        (servers["qwen"], {"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}}},
         "response_format", "strin"),
        (servers["qwen"], {"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
        (servers["qwen"], {"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        (servers["qwen"], {"guided_regex": "(unclosed"}, "guided_regex", "parenthesis"),
        (servers["qwen"], {"guided_grammar": "root ::= undefined_rule"}, "guided_grammar", "undefined_rule"),
        (servers["qwen"], {"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "only one"),
        (servers["qwen"], {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "nope"),
        (servers["qwen"], {"tool_choice": "required"}, "tool_choice", "requires tools"),
        (servers["qwen"], {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format", "tool_choice"),
        (server, {"tools": TOOLS}, "tools", "tool-call format"),  # the default tiny template: no parser
        (server, {"tools": TOOLS, "tool_choice": "required"}, "tools", "tool-call format"),
    ]
    for srv, body, param, words in cases:
        resp = httpx.post(f"{srv.url}/v1/chat/completions", headers=srv.headers, timeout=60,
                          json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 5, **body})
        assert resp.status_code == 400, (body, resp.text)
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
        assert words in error["message"], (body, error)
    resp = httpx.post(f"{servers['qwen'].url}/v1/completions", headers=servers["qwen"].headers, timeout=60,
                      json={"model": MODEL_NAME, "prompt": "x", "guided_json": {"type": 5}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "guided_json"


def test_grammar_metrics(servers):
    server = servers["qwen"]
    before = server.metric("infergrid:grammar_compile_seconds_count")
    regex = f"{uuid.uuid4().hex[:8]}[a-f]{{2}}"  # a regex this server has not compiled yet
    client = _client(server)
    for _ in range(2):  # the second is a cache hit: no compile observed
        out = client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=20, extra_body={"guided_regex": regex})
        assert out.choices[0].text.startswith(regex[:8])
    assert server.metric("infergrid:grammar_compile_seconds_count") == before + 1
    assert server.metric("infergrid:structured_output_requests_total", kind="regex") >= 2
