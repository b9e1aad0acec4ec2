"""The seed API: POST /v1/generate, POST /v1/batch, GET /v1/health, GET /v1/metrics (JSON).

`/v1/generate` takes a prompt or token ids, a priority (lower runs first) and an optional SLA
deadline in ms; a request still waiting at its deadline finishes with finish_reason "abort" and
stop_reason "deadline". `/v1/batch` validates every item first, then runs them together.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from infergrid.worker.sampling_params import SamplingParams

from .errors import bad_request
from .logprobs import LogprobFormatter
from .seed_protocol import BatchRequest, BatchResponse, GenerateRequest, GenerateResponse
from .serving_base import PromptInput, ServingBase, gather_or_cancel
from .structured import compile_grammar, structured_outputs_of


class SeedServing(ServingBase):
    """The seed note's RequestHandler, over the same engine as the OpenAI API."""

    def prepare(self, req: GenerateRequest, param_prefix: str = "") -> tuple[PromptInput, SamplingParams]:
        """Checks and engine inputs for one generate request (4xx on the first problem)."""
        self.check_model(req.model)
        if (req.prompt is None) == (req.prompt_token_ids is None):
            raise bad_request("exactly one of 'prompt' and 'prompt_token_ids' must be given",
                              f"{param_prefix}prompt")
        if req.prompt is not None:
            prompt = self.prompt_from_text(req.prompt, f"{param_prefix}prompt")
        else:
            prompt = self.prompt_from_ids(req.prompt_token_ids or [], f"{param_prefix}prompt_token_ids")
        self.check_length(prompt, req.max_tokens, f"{param_prefix}prompt", f"{param_prefix}max_tokens")
        try:
            params = self.sampling_params(req, max_tokens=req.max_tokens, logprobs=req.logprobs,
                                          structured_outputs=structured_outputs_of(req)[0])
        except Exception as exc:
            if param_prefix and getattr(exc, "param", None):
                exc.param = param_prefix + exc.param  # type: ignore[attr-defined]
            raise
        return prompt, params

    async def compile_constraint(self, req: GenerateRequest, params: SamplingParams, param_prefix: str = "") -> None:
        """Compile a guided_* constraint off the event loop (400 naming the field when it is invalid)."""
        if params.structured_outputs is not None:
            field = param_prefix + structured_outputs_of(req)[1]
            await compile_grammar(self.engine, params.structured_outputs, field, self.metrics)

    @staticmethod
    def deadline_of(req: GenerateRequest, arrival: float) -> float | None:
        """Absolute deadline on the engine's clock (time.monotonic)."""
        return None if req.deadline_ms is None else arrival + req.deadline_ms / 1000.0

    def response(self, request_id: str, req: GenerateRequest, final: Any, ttft_s: float | None,
                 started: float) -> GenerateResponse:
        c = final.outputs[0]
        logprobs = None
        if req.logprobs is not None:
            logprobs = LogprobFormatter(self.tokenizer).sampled(c.token_ids, c.logprobs)
        return GenerateResponse(
            id=request_id, model=self.model_name, text=c.text, token_ids=list(c.token_ids),
            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            prompt_tokens=len(final.prompt_token_ids), completion_tokens=len(c.token_ids),
            cached_tokens=int(final.num_cached_tokens or 0), logprobs=logprobs,
            ttft_ms=None if ttft_s is None else ttft_s * 1000.0,
            latency_ms=(time.monotonic() - started) * 1000.0,
        )

    async def generate_one(self, req: GenerateRequest) -> GenerateResponse:
        """POST /v1/generate."""
        started = time.monotonic()
        prompt, params = self.prepare(req)
        await self.compile_constraint(req, params)
        request_id = f"gen-{uuid.uuid4().hex}"
        with self.admission.admit(1):
            final, ttft = await self.run_to_end(prompt, params, request_id, priority=req.priority,
                                                deadline_s=self.deadline_of(req, started))
        return self.response(request_id, req, final, ttft, started)

    async def generate_batch(self, batch: BatchRequest) -> BatchResponse:
        """POST /v1/batch: all items validated before any runs; answers in request order."""
        started = time.monotonic()
        prepared = [self.prepare(r, f"requests[{i}].") for i, r in enumerate(batch.requests)]
        for i, (r, (_, params)) in enumerate(zip(batch.requests, prepared, strict=True)):
            await self.compile_constraint(r, params, f"requests[{i}].")
        ids = [f"batch-{uuid.uuid4().hex}" for _ in prepared]
        with self.admission.admit(len(prepared)):
            results = await gather_or_cancel([
                self.run_to_end(p, sp, rid, priority=r.priority, deadline_s=self.deadline_of(r, started))
                for (p, sp), rid, r in zip(prepared, ids, batch.requests, strict=True)])
        responses = [self.response(rid, r, final, ttft, started)
                     for rid, r, (final, ttft) in zip(ids, batch.requests, results, strict=True)]
        elapsed = time.monotonic() - started
        tokens = sum(r.completion_tokens for r in responses)
        return BatchResponse(responses=responses, total_latency_ms=elapsed * 1000.0,
                             total_completion_tokens=tokens,
                             throughput_tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """GET /v1/health: (healthy, body)."""
        lc = self.lifecycle
        healthy = lc.is_healthy()
        return healthy, {
            "status": "ok" if healthy else "unhealthy",
            "state": lc.state,
            "ready": lc.is_ready(),
            "model": self.model_name,
            "uptime_s": time.time() - lc.started_at,
            "engine_stalled": lc.detector.is_stalled,
            "error": lc.error,
        }

    def metrics_summary(self) -> dict[str, Any]:
        """GET /v1/metrics: engine counters, admission state and recent latency percentiles."""
        stats = self.lifecycle.stats()
        engine: dict[str, Any] = {}
        if stats is not None:
            engine = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(vars(stats))
            queries = engine.get("prefix_cache_queries_total") or 0
            drafts = engine.get("spec_decode_num_draft_tokens_total") or 0
            engine["prefix_cache_hit_rate"] = (engine.get("prefix_cache_hits_total", 0) / queries) if queries else None
            engine["spec_decode_acceptance_rate"] = (
                engine.get("spec_decode_num_accepted_tokens_total", 0) / drafts) if drafts else None
        return {
            "model": self.model_name,
            "state": self.lifecycle.state,
            "engine": engine,
            "admission": {"num_in_flight": self.admission.num_in_flight,
                          "max_queue_size": self.admission.max_queue_size,
                          "rejected": dict(self.admission.num_rejected)},
            **self.metrics.summary(),
        }
