"""Structured output on the HTTP API: a request's `response_format` / `guided_*` / `structured_outputs`
fields -> the engine's StructuredOutputsParams, compiled off the event loop when the request arrives."""

from __future__ import annotations

import asyncio
from typing import Any

from infergrid.worker.structured_output.grammar import GrammarError
from infergrid.worker.structured_output.params import StructuredOutputsParams

from .errors import bad_request
from .metrics import ServerMetrics
from .protocol import ResponseFormat, SamplingFields

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs_of(req: SamplingFields,
                          response_format: ResponseFormat | None = None) -> tuple[StructuredOutputsParams | None, str]:
    """The request's constraint (None: free text) and the request field that set it (400 when
    several are given or one is malformed)."""
    if req.guided_whitespace_pattern is not None:
        raise bad_request("guided_whitespace_pattern is not supported", "guided_whitespace_pattern",
                          code="unsupported_parameter")
    found: list[tuple[str, dict[str, Any]]] = []
    for field, kind in _GUIDED.items():
        value = getattr(req, field)
        if value is not None:
            found.append((field, {kind: value}))
    if req.structured_outputs is not None:
        so = req.structured_outputs
        kwargs = {k: v for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                    ("grammar", so.grammar), ("json_object", so.json_object)) if v}
        found.append(("structured_outputs", kwargs))
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            found.append(("response_format", {"json_object": True}))
        else:
            spec = response_format.json_schema
            if spec is None:
                raise bad_request("response_format of type json_schema needs a 'json_schema' object",
                                  "response_format.json_schema")
            found.append(("response_format", {"json": spec.schema_ if spec.schema_ is not None else {}}))
    if not found:
        return None, ""
    if len(found) > 1:
        raise bad_request(f"only one structured output constraint may be given, got "
                          f"{', '.join(f for f, _ in found)}", found[1][0])
    field, kwargs = found[0]
    try:
        return StructuredOutputsParams(**kwargs), field
    except ValueError as exc:
        raise bad_request(str(exc), field) from exc


async def compile_grammar(engine: Any, params: StructuredOutputsParams, field: str, metrics: ServerMetrics) -> None:
    """Compile (or find in the cache) the grammar in a worker thread, so that neither the event loop
    nor the engine step waits for it; 400 naming the problem when it cannot be compiled."""
    try:
        _, seconds = await asyncio.to_thread(engine.grammar_compiler.compile, params)
    except GrammarError as exc:
        raise bad_request(str(exc), field, code="invalid_grammar") from exc
    metrics.constrained_requests.labels(metrics.model_name, params.kind).inc()
    if seconds is not None:
        metrics.grammar_compile.observe(seconds)
