"""schemathesis against the worker's own OpenAPI schema: generated valid and invalid requests for
every operation, no server errors, responses conform to the schema, and the server stays healthy."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from server_harness import WorkerServer

EXAMPLES_PER_MODE = {GenerationMode.POSITIVE: 150, GenerationMode.NEGATIVE: 100}  # 250 per operation
# Generated requests are real generations: keep them short so the run stays fast on 2 CPU cores.
MAX_TOKENS_CAP, N_CAP = 3, 2
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def shrink(body: Any) -> None:
    """Cap max_tokens / n (only positive values, so negative cases stay negative) in place."""
    if isinstance(body, list):
        for item in body:
            shrink(item)
        return
    if not isinstance(body, dict):
        return
    for key, cap in (("max_tokens", MAX_TOKENS_CAP), ("max_completion_tokens", MAX_TOKENS_CAP), ("n", N_CAP)):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            body[key] = cap
    for value in body.values():
        if isinstance(value, list | dict):
            shrink(value)


POST_OPERATIONS = ["/v1/completions", "/v1/chat/completions", "/v1/generate", "/v1/batch"]
GET_OPERATIONS = ["/v1/models", "/v1/health", "/v1/metrics", "/health", "/ready", "/metrics"]


@pytest.fixture(scope="module")
def schema(server: WorkerServer) -> Any:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=server.headers)


def fuzz(server: WorkerServer, operation: Any, mode: GenerationMode, num_examples: int) -> int:
    """Run `num_examples` generated cases of one mode; returns how many were sent."""
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    sent = 0

    @settings(max_examples=num_examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        nonlocal sent
        shrink(case.body)
        response = case.call(base_url=server.url, headers=server.headers, timeout=60)
        case.validate_response(response, checks=checks)
        sent += 1

    run()
    return sent


def test_schema_lists_every_operation(schema: Any) -> None:
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert labels == {f"POST {p}" for p in POST_OPERATIONS} | {f"GET {p}" for p in GET_OPERATIONS}


@pytest.mark.slow
@pytest.mark.parametrize("path", POST_OPERATIONS)
def test_generated_requests_get_no_server_error(server: WorkerServer, schema: Any, path: str) -> None:
    operation = schema[path]["POST"]
    sent = sum(fuzz(server, operation, mode, n) for mode, n in EXAMPLES_PER_MODE.items())
    print(f"{path}: {sent} generated requests")
    assert sent >= 200
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("path", GET_OPERATIONS)
def test_get_operations_conform(server: WorkerServer, schema: Any, path: str) -> None:
    assert fuzz(server, schema[path]["GET"], GenerationMode.POSITIVE, 5) >= 1


def test_server_healthy_after_fuzzing(server: WorkerServer) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert server.metric("infergrid:num_requests_in_flight") == 0
    with server.client() as http:
        ok = http.post("/v1/completions", json={"prompt": "still alive?", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
