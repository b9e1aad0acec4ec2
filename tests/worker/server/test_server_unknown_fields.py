"""Interoperability with routers and gateways that add their own fields (issue 19): unknown top-level
request fields are ignored like vLLM ignores them -- logged once per field name and listed in the
`X-Ignored-Fields` response header, never a 400 -- while malformed known fields stay 400."""

from __future__ import annotations

import httpx
import pytest
from server_harness import WorkerServer

# What vllm-router (PyPI) adds to every request it forwards.
VLLM_ROUTER_FIELDS = {"no_stop_trim": True, "return_hidden_states": False, "separate_reasoning": True}


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    ("/v1/generate", {"prompt": "Hello", "max_tokens": 2}),
])
def test_unknown_top_level_fields_are_ignored_and_listed(server: WorkerServer, path: str,
                                                         body: dict[str, object]) -> None:
    with server.client() as client:
        resp = client.post(path, json={**body, **VLLM_ROUTER_FIELDS, "frobnicate": {"x": [1]}})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-ignored-fields"].split(",") == sorted([*VLLM_ROUTER_FIELDS, "frobnicate"])


def test_streaming_response_lists_ignored_fields(server: WorkerServer) -> None:
    with server.client() as client, client.stream(
            "POST", "/v1/completions",
            json={"prompt": "Hello", "max_tokens": 2, "stream": True, "no_stop_trim": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["x-ignored-fields"] == "no_stop_trim"
        assert "[DONE]" in "".join(resp.iter_text())


def test_known_fields_stay_strict_and_clean_requests_have_no_header(server: WorkerServer) -> None:
    with server.client() as client:
        bad = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": "2", "no_stop_trim": True})
        clean = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens", bad.text
    assert clean.status_code == 200 and "x-ignored-fields" not in clean.headers


def test_each_ignored_field_is_logged_once(server: WorkerServer) -> None:
    with server.client() as client:
        for _ in range(3):
            assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1,
                                                        "logged_once_probe": 1}).status_code == 200
    assert server.log_tail(200_000).count("ignoring unknown request field 'logged_once_probe'") == 1
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
