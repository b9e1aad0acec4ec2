"""The worker's FastAPI app: OpenAI API, seed API, probes and Prometheus metrics on one port.

    client -> ApiKeyMiddleware -> BodyGuardMiddleware -> route -> admission -> AsyncLLM
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import generate_latest
from starlette.responses import Response

from .admission import AdmissionController
from .disconnect import with_cancellation
from .errors import error_body, install_error_handlers
from .lifecycle import Lifecycle
from .metrics import EngineStatsCollector, ServerGauges, ServerMetrics
from .middleware import ApiKeyMiddleware, BodyGuardMiddleware, IgnoredFieldsMiddleware
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from .seed_api import SeedServing
from .seed_protocol import BatchRequest, BatchResponse, GenerateRequest, GenerateResponse
from .serving_chat import OpenAIServingChat
from .serving_completions import OpenAIServingCompletion

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class ServerSettings:
    """HTTP-side settings (engine arguments live in EngineConfig)."""

    model_path: str
    served_model_names: tuple[str, ...]
    api_key: str | None = None
    max_queue_size: int = 256
    drain_timeout_s: float = 30.0
    max_body_bytes: int = 4 * 1024 * 1024
    stall_timeout_s: float = 30.0
    watchdog_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout_s}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_request_body_bytes must be >= 1024, got {self.max_body_bytes}")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


_GEN_ERRORS = _errors(400, 401, 404, 413, 429, 500, 503)
# One server-sent event (OpenAPI 3.2 style: the schema describes each event of the stream).
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a JSON chunk, or [DONE] as the last event"},
    "event": {"type": "string"}, "id": {"type": "string"}}}
_SSE_200: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}},
          "description": "JSON, or server-sent events when stream is true"}}


def cache_config_labels(lifecycle: Lifecycle) -> dict[str, str]:
    """vllm:cache_config_info's labels (vLLM's CacheConfig fields as strings); empty before the load."""
    config = getattr(getattr(lifecycle.engine, "engine", None), "config", None)
    stats = lifecycle.stats()
    if config is None or stats is None:
        return {}
    return {"block_size": str(config.block_size), "num_gpu_blocks": str(stats.num_total_blocks),
            "num_cpu_blocks": "0", "gpu_memory_utilization": str(config.gpu_memory_utilization),
            "enable_prefix_caching": str(bool(config.enable_prefix_caching)), "cache_dtype": "auto",
            "engine": "0"}


def build_app(settings: ServerSettings, engine_factory: Callable[[], Any]) -> FastAPI:
    """The app; `engine_factory()` (blocking, run in a thread at startup) returns an AsyncLLM."""
    admission = AdmissionController(settings.max_queue_size)
    lifecycle = Lifecycle(engine_factory, admission, stall_timeout_s=settings.stall_timeout_s,
                          watchdog_interval_s=settings.watchdog_interval_s)
    model_name = settings.served_model_names[0]
    metrics = ServerMetrics(model_name)
    metrics.registry.register(EngineStatsCollector(lifecycle.stats, model_name, ServerGauges(
        num_in_flight=lambda: admission.num_in_flight, rejected=lambda: admission.num_rejected,
        is_ready=lifecycle.is_ready, is_healthy=lifecycle.is_healthy,
        is_draining=lambda: lifecycle.is_draining, cache_config=lambda: cache_config_labels(lifecycle))))
    common = (lifecycle, admission, metrics, settings.served_model_names)
    completions, chat, seed = OpenAIServingCompletion(*common), OpenAIServingChat(*common), SeedServing(*common)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await lifecycle.start()
        try:
            yield
        finally:
            await lifecycle.stop()

    app = FastAPI(title="infergrid worker", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  strict_content_type=False)
    app.state.lifecycle, app.state.admission, app.state.metrics = lifecycle, admission, metrics
    install_error_handlers(app)

    # ------------------------------------------------------------------------------------ probes
    @app.get("/health", responses=_errors(503))
    async def health() -> Response:
        """Liveness: the engine loop is alive and not stalled (200 while loading)."""
        if lifecycle.is_healthy():
            return JSONResponse({"status": "ok"})
        dead = getattr(lifecycle.engine, "dead_error", None)  # e.g. a tensor-parallel rank died
        reason = lifecycle.error or (str(dead) if dead is not None else "engine loop is not making progress")
        return JSONResponse(error_body(503, f"unhealthy: {reason}", code="unhealthy"), status_code=503)

    @app.get("/ready", responses=_errors(503))
    async def ready() -> Response:
        """Readiness: model loaded, 1-token warm-up done, not draining, healthy."""
        if lifecycle.is_ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse(error_body(503, f"not ready: {lifecycle.state}", code=lifecycle.state),
                            status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus() -> Response:
        """Prometheus exposition (vLLM metric names, label model_name)."""
        return Response(generate_latest(metrics.registry), media_type=PROMETHEUS_CONTENT_TYPE)

    # ------------------------------------------------------------------------------------ OpenAI
    @app.get("/v1/models", response_model=ModelList, responses=_errors(401))
    async def list_models() -> ModelList:
        """The served model (under each served name)."""
        max_len = lifecycle.max_model_len() if lifecycle.engine is not None else None
        return ModelList(data=[ModelCard(id=name, root=settings.model_path, max_model_len=max_len)
                               for name in settings.served_model_names])

    @app.post("/v1/completions", response_model=CompletionResponse, responses={**_GEN_ERRORS, **_SSE_200})
    @with_cancellation
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Any:
        """OpenAI completions; `stream: true` answers with server-sent events ending in [DONE]."""
        return await completions.create(request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={**_GEN_ERRORS, **_SSE_200})
    @with_cancellation
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Any:
        """OpenAI chat completions with the checkpoint's chat template."""
        return await chat.create(request)

    # -------------------------------------------------------------------------------------- seed
    @app.post("/v1/generate", response_model=GenerateResponse, responses=_GEN_ERRORS)
    @with_cancellation
    async def generate(request: GenerateRequest, raw_request: Request) -> Any:
        """One prompt (text or token ids) with priority and an optional deadline_ms."""
        return await seed.generate_one(request)

    @app.post("/v1/batch", response_model=BatchResponse, responses=_GEN_ERRORS)
    @with_cancellation
    async def batch(request: BatchRequest, raw_request: Request) -> Any:
        """Several generate requests, validated together, run together."""
        return await seed.generate_batch(request)

    @app.get("/v1/health", responses=_errors(401, 503))
    async def seed_health() -> Response:
        """Health summary as JSON (503 when unhealthy)."""
        healthy, body = seed.health()
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/v1/metrics", responses=_errors(401))
    async def seed_metrics() -> dict[str, Any]:
        """Engine counters, admission state and recent latency percentiles as JSON."""
        return seed.metrics_summary()

    app.add_middleware(IgnoredFieldsMiddleware)
    app.add_middleware(BodyGuardMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    return app
