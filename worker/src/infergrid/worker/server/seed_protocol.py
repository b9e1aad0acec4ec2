"""Request and response models of the engine's own API: POST /v1/generate and /v1/batch (seed_api.py),
beside the OpenAI-compatible ones of protocol.py."""

from __future__ import annotations

from pydantic import Field

from .protocol import MAX_TOP_LOGPROBS, RequestModel, ResponseModel, SamplingFields, TokenId


class GenerateRequest(SamplingFields, RequestModel):
    """POST /v1/generate: one prompt (text or token ids) with a priority and an optional deadline."""

    model: str | None = None
    prompt: str | None = None
    prompt_token_ids: list[TokenId] | None = None
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    deadline_ms: int | None = Field(None, ge=1, le=86_400_000,
                                    description="finish within this many ms from arrival (SLA)")


class GenerateResponse(ResponseModel):
    """The answer to one /v1/generate request."""

    id: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list[float] | None = None
    ttft_ms: float | None = None
    latency_ms: float


class BatchRequest(RequestModel):
    """POST /v1/batch: several /v1/generate requests run together (all validated first)."""

    requests: list[GenerateRequest] = Field(min_length=1, max_length=256)


class BatchResponse(ResponseModel):
    """Answers in request order plus batch totals."""

    responses: list[GenerateResponse]
    total_latency_ms: float
    total_completion_tokens: int
    throughput_tokens_per_s: float
