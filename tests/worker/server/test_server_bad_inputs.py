"""A table of bad requests: each gets a 4xx with OpenAI error JSON (param named where it applies),
never a 422 or 5xx, and the server keeps answering a canary request afterwards."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from server_harness import MODEL_NAME, WorkerServer

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
GENERATE, BATCH = "/v1/generate", "/v1/batch"
JSON_CT = {"Content-Type": "application/json"}
UNSET = object()


@dataclass
class Bad:
    """One bad request and what the answer must say."""

    id: str
    path: str
    body: Any = None  # merged into a valid base body for the path (UNSET values delete the key)
    raw: bytes | None = None  # sent as-is instead of `body`
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON_CT))
    status: int = 400
    param: str | None = None
    method: str = "POST"


def completion(**overrides: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2, **overrides}


def chat(**overrides: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **overrides}


def with_key(body: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    out = dict(body)
    if value is UNSET:
        out.pop(key, None)
    else:
        out[key] = value
    return out


CASES = [
    # -------------------------------------------------------------- wrong types and ranges (completions)
    Bad("max_tokens-string", COMPLETIONS, completion(max_tokens="5"), param="max_tokens"),
    Bad("max_tokens-float", COMPLETIONS, completion(max_tokens=1.5), param="max_tokens"),
    Bad("max_tokens-bool", COMPLETIONS, completion(max_tokens=True), param="max_tokens"),
    Bad("max_tokens-negative", COMPLETIONS, completion(max_tokens=-1), param="max_tokens"),
    Bad("max_tokens-zero", COMPLETIONS, completion(max_tokens=0), param="max_tokens"),
    Bad("max_tokens-huge", COMPLETIONS, completion(max_tokens=10**12), param="max_tokens"),
    Bad("max_tokens-over-context", COMPLETIONS, completion(max_tokens=256), param="max_tokens"),
    Bad("temperature-negative", COMPLETIONS, completion(temperature=-0.5), param="temperature"),
    Bad("temperature-nan", COMPLETIONS, raw=b'{"prompt": "Hi", "max_tokens": 2, "temperature": NaN}',
        param="temperature"),
    Bad("temperature-infinity", COMPLETIONS, raw=b'{"prompt": "Hi", "max_tokens": 2, "temperature": Infinity}',
        param="temperature"),
    Bad("temperature-string", COMPLETIONS, completion(temperature="hot"), param="temperature"),
    Bad("top_p-zero", COMPLETIONS, completion(top_p=0), param="top_p"),
    Bad("top_p-above-one", COMPLETIONS, completion(top_p=1.5), param="top_p"),
    Bad("top_k-float", COMPLETIONS, completion(top_k=2.5), param="top_k"),
    Bad("top_k-integral-float", COMPLETIONS, completion(top_k=2.0), param="top_k"),
    Bad("top_k-below-minus-one", COMPLETIONS, completion(top_k=-2), param="top_k"),
    Bad("min_p-above-one", COMPLETIONS, completion(min_p=2), param="min_p"),
    Bad("presence_penalty-range", COMPLETIONS, completion(presence_penalty=3), param="presence_penalty"),
    Bad("frequency_penalty-range", COMPLETIONS, completion(frequency_penalty=-3), param="frequency_penalty"),
    Bad("repetition_penalty-zero", COMPLETIONS, completion(repetition_penalty=0), param="repetition_penalty"),
    Bad("n-zero", COMPLETIONS, completion(n=0), param="n"),
    Bad("n-huge", COMPLETIONS, completion(n=1000), param="n"),
    Bad("logprobs-too-many", COMPLETIONS, completion(logprobs=50), param="logprobs"),
    Bad("logprobs-negative", COMPLETIONS, completion(logprobs=-1), param="logprobs"),
    Bad("seed-beyond-int64", COMPLETIONS, completion(seed=2**70), param="seed"),
    Bad("seed-string", COMPLETIONS, completion(seed="abc"), param="seed"),
    Bad("stop-number", COMPLETIONS, completion(stop=123), param="stop"),
    Bad("stop-empty-string", COMPLETIONS, completion(stop=[""]), param="stop"),
    Bad("stop_token_ids-negative", COMPLETIONS, completion(stop_token_ids=[-1]), param="stop_token_ids[0]"),
    Bad("min_tokens-over-max", COMPLETIONS, completion(min_tokens=5, max_tokens=2), param="min_tokens"),
    Bad("priority-float", COMPLETIONS, completion(priority=0.5), param="priority"),
    Bad("stream-string", COMPLETIONS, completion(stream="yes"), param="stream"),
    Bad("stream_options-without-stream", COMPLETIONS, completion(stream_options={"include_usage": True}),
        param="stream_options"),
    # Unknown TOP-level fields are ignored (test_server_unknown_fields.py); nested ones stay refused.
    Bad("unknown-nested-field", COMPLETIONS, completion(stream=True, stream_options={"frobnicate": 1}),
        param="stream_options.frobnicate"),
    # ---------------------------------------------------------------------------------------- prompts
    Bad("prompt-empty-string", COMPLETIONS, completion(prompt=""), param="prompt"),
    Bad("prompt-empty-list", COMPLETIONS, completion(prompt=[]), param="prompt"),
    Bad("prompt-empty-token-list", COMPLETIONS, completion(prompt=[[]]), param="prompt[0]"),
    Bad("prompt-missing", COMPLETIONS, with_key(completion(), "prompt", UNSET), param="prompt"),
    Bad("prompt-object", COMPLETIONS, completion(prompt={"a": 1}), param="prompt"),
    Bad("prompt-mixed-list", COMPLETIONS, completion(prompt=[1, "a"]), param="prompt"),
    Bad("prompt-token-out-of-vocab", COMPLETIONS, completion(prompt=[10**6]), param="prompt"),
    Bad("prompt-negative-token", COMPLETIONS, completion(prompt=[-5]), param="prompt"),
    Bad("prompt-over-max-model-len", COMPLETIONS, completion(prompt="the sea " * 400), param="prompt"),
    Bad("prompt-lone-surrogate", COMPLETIONS, raw=b'{"prompt": "abc \\ud800 def", "max_tokens": 2}', param="prompt"),
    # ---------------------------------------------------------------------------- unsupported options
    Bad("echo-with-logprobs", COMPLETIONS, completion(echo=True, logprobs=1), param="echo"),
    Bad("echo-with-max_tokens-0", COMPLETIONS, completion(echo=True, max_tokens=0), param="max_tokens"),
    Bad("best_of-not-n", COMPLETIONS, completion(best_of=3), param="best_of"),
    Bad("suffix", COMPLETIONS, completion(suffix="x"), param="suffix"),
    Bad("logit_bias", COMPLETIONS, completion(logit_bias={"5": 10}), param="logit_bias"),
    Bad("unknown-model", COMPLETIONS, completion(model="gpt-9"), status=404, param="model"),
    Bad("unknown-model-surrogate", COMPLETIONS, raw=b'{"model": "\\udfff", "prompt": "Hi"}', status=404,
        param="model"),
    # ------------------------------------------------------------------------------------------- chat
    Bad("chat-messages-empty", CHAT, chat(messages=[]), param="messages"),
    Bad("chat-messages-missing", CHAT, with_key(chat(), "messages", UNSET), param="messages"),
    Bad("chat-messages-string", CHAT, chat(messages="hi"), param="messages"),
    Bad("chat-role-unknown", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), param="messages[0].role"),
    Bad("chat-content-number", CHAT, chat(messages=[{"role": "user", "content": 5}]),
        param="messages[0].content"),
    Bad("chat-content-image", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), param="messages[0].content"),
    Bad("chat-top_logprobs-without-logprobs", CHAT, chat(top_logprobs=2), param="top_logprobs"),
    # (the tiny default chat template has no tool-call format: tools cannot be parsed back)
    Bad("chat-tools-no-parser", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), param="tools"),
    Bad("chat-tool_choice-unknown", CHAT, chat(tool_choice="sometimes"), param="tool_choice"),
    Bad("chat-response_format-unknown", CHAT, chat(response_format={"type": "xml"}), param="response_format.type"),
    Bad("chat-response_format-bad-schema", CHAT, chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}), param="response_format"),
    Bad("chat-guided_regex-bad", CHAT, chat(guided_regex="[a-"), param="guided_regex"),
    Bad("chat-max_completion_tokens-negative", CHAT, chat(max_completion_tokens=-5), param="max_completion_tokens"),
    Bad("chat-max_completion_tokens-over-context", CHAT, chat(max_completion_tokens=10_000),
        param="max_completion_tokens"),
    Bad("chat-temperature-nan", CHAT, raw=b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        param="temperature"),
    # ------------------------------------------------------------------------------------------- seed
    Bad("generate-prompt-and-ids", GENERATE, {"prompt": "Hi", "prompt_token_ids": [1, 2]}, param="prompt"),
    Bad("generate-no-prompt", GENERATE, {"max_tokens": 2}, param="prompt"),
    Bad("generate-deadline-zero", GENERATE, {"prompt": "Hi", "deadline_ms": 0}, param="deadline_ms"),
    Bad("generate-deadline-string", GENERATE, {"prompt": "Hi", "deadline_ms": "soon"}, param="deadline_ms"),
    Bad("batch-empty", BATCH, {"requests": []}, param="requests"),
    Bad("batch-item-invalid", BATCH, {"requests": [{"prompt": "a"}, {"prompt": "b", "max_tokens": -3}]},
        param="requests[1].max_tokens"),
    Bad("batch-item-too-long", BATCH, {"requests": [{"prompt": "a"}, {"prompt_token_ids": [5] * 300}]},
        param="requests[1].prompt"),
    Bad("batch-too-large", BATCH, {"requests": [{"prompt": "a"}] * 300}, param="requests"),
    # -------------------------------------------------------------------------------------- transport
    Bad("malformed-json", COMPLETIONS, raw=b'{"prompt": "x",'),
    Bad("json-array-body", COMPLETIONS, raw=b"[1, 2]"),
    Bad("json-string-body", COMPLETIONS, raw=b'"hello"'),
    Bad("json-null-body", COMPLETIONS, raw=b"null"),
    Bad("empty-body", COMPLETIONS, raw=b""),
    Bad("deeply-nested-json", COMPLETIONS, raw=b"[" * 100_000 + b"]" * 100_000),
    Bad("wrong-content-type", COMPLETIONS, raw=json.dumps(completion()).encode(),
        headers={"Content-Type": "text/plain"}),
    Bad("form-content-type", COMPLETIONS, raw=b"prompt=hi&max_tokens=2",
        headers={"Content-Type": "application/x-www-form-urlencoded"}),
    Bad("huge-body", COMPLETIONS, raw=b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}', status=413),
    Bad("invalid-utf8", COMPLETIONS, raw=b'{"prompt": "\xff\xfe\xfd", "max_tokens": 2}'),
    Bad("utf16-body", COMPLETIONS, raw=json.dumps(completion()).encode("utf-16")),
    Bad("unknown-route", "/v1/nope", {}, status=404),
    Bad("wrong-method", COMPLETIONS, method="GET", status=405),
]


def send(server: WorkerServer, case: Bad) -> httpx.Response:
    with server.client(timeout=30.0) as http:
        if case.method == "GET":
            return http.get(case.path)
        content = case.raw if case.raw is not None else json.dumps(case.body).encode()
        return http.request(case.method, case.path, content=content, headers=case.headers)


def canary(server: WorkerServer) -> None:
    with server.client() as http:
        ok = http.post(COMPLETIONS, json=completion(max_tokens=1))
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 1


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_openai_error(server: WorkerServer, case: Bad) -> None:
    resp = send(server, case)
    assert resp.status_code == case.status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if case.param is not None:
        assert error["param"] == case.param, error
    canary(server)


def test_server_healthy_after_bad_inputs(server: WorkerServer) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert server.metric("vllm:num_requests_running") == 0
    assert server.metric("infergrid:num_requests_in_flight") == 0


def test_chunked_oversized_body_is_413(server: WorkerServer) -> None:
    def body():  # no Content-Length: sent with chunked transfer encoding
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"a" * 65536
        yield b'"}'

    with server.client(timeout=30.0) as http:
        resp = http.post(COMPLETIONS, content=body(), headers=JSON_CT)
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["code"] == "request_too_large"
    canary(server)
