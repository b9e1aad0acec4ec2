"""A typed, defaulted view of an InferenceService body.

The CRD's OpenAPI defaults are applied by the API server; this module applies the same defaults again so
that builders give the same answer for a body that never went through the server (unit tests, dry runs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from infergrid.operator.sources import ModelSource


@dataclasses.dataclass(frozen=True)
class SecretKeyRef:
    """A key inside a Secret of the service's namespace; the operator only names it, never reads it."""

    name: str
    key: str


@dataclasses.dataclass(frozen=True)
class SpeculativeSpec:
    """Speculative decoding: `none`, `ngram` or `draft` (with a draft model source).

    `num_tokens` has the CRD's default (4); it means nothing while `method` is `none`, nor does
    `disable_by_batch_size` (None: the worker's default).
    """

    method: str = "none"
    num_tokens: int = 4
    disable_by_batch_size: int | None = None  # no drafts in a step where more requests sample
    draft_source: ModelSource | None = None
    draft_lm_head_dtype: str | None = None  # "fp8" (draft.lmHeadDtype)


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Engine arguments, with vLLM's names in snake_case."""

    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    block_size: int | None = None
    enforce_eager: bool | None = None
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True
    speculative: SpeculativeSpec = SpeculativeSpec()


@dataclasses.dataclass(frozen=True)
class AutoscalingSpec:
    """Autoscaling bounds and targets (`autoscaler.decide` reads them)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_queue_depth: float = 4.0
    target_kv_cache_usage: float = 0.85
    target_ttft_seconds: float | None = None
    scale_down_delay_seconds: int = 300


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """The per-service router: pods in front of the workers, how it spreads requests, its API keys."""

    replicas: int = 1
    policy: str = "prefix-aware"
    api_key_secret: SecretKeyRef | None = None


@dataclasses.dataclass(frozen=True)
class ResourcesSpec:
    """Per worker pod resources; the GPU count comes from the engine's tensor parallel size."""

    gpu_resource_name: str = "nvidia.com/gpu"
    cpu: str | None = None
    memory: str | None = None
    shm_size: str = "2Gi"


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """Everything the builders need from one InferenceService."""

    name: str
    namespace: str
    uid: str
    generation: int
    source: ModelSource
    served_name: str
    token_secret: SecretKeyRef | None
    engine: EngineSpec
    replicas: int | None
    autoscaling: AutoscalingSpec | None
    router: RouterSpec
    resources: ResourcesSpec
    startup_seconds: int
    drain_seconds: int
    image: str | None
    image_pull_policy: str | None
    image_pull_secrets: tuple[str, ...]
    node_selector: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]
    affinity: Mapping[str, Any] | None
    priority_class_name: str | None
    pod_template: Mapping[str, Any]

    @property
    def is_autoscaled(self) -> bool:
        return self.autoscaling is not None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ServiceSpec:
        """Parse an InferenceService body (a dict or kopf Body); raises ValueError on a bad source."""
        meta = body.get("metadata", {})
        spec = body.get("spec", {}) or {}
        model = spec.get("model", {}) or {}
        timeouts = spec.get("timeouts", {}) or {}
        token = model.get("tokenSecretRef")
        autoscaling = spec.get("autoscaling")
        return cls(
            name=meta["name"],
            namespace=meta.get("namespace", "default"),
            uid=meta.get("uid", ""),
            generation=int(meta.get("generation", 1)),
            source=ModelSource.parse(model["source"], revision=model.get("revision")),
            served_name=model.get("servedName") or meta["name"],
            token_secret=SecretKeyRef(token["name"], token.get("key", "token")) if token else None,
            engine=_parse_engine(spec.get("engine", {}) or {}),
            replicas=spec.get("replicas"),
            autoscaling=_parse_autoscaling(autoscaling) if autoscaling is not None else None,
            router=_parse_router(spec.get("router", {}) or {}),
            resources=_parse_resources(spec.get("resources", {}) or {}),
            startup_seconds=int(timeouts.get("startupSeconds", 1800)),
            drain_seconds=int(timeouts.get("drainSeconds", 30)),
            image=spec.get("image"),
            image_pull_policy=spec.get("imagePullPolicy"),
            image_pull_secrets=tuple(s["name"] for s in spec.get("imagePullSecrets", []) or []),
            node_selector=dict(spec.get("nodeSelector", {}) or {}),
            tolerations=tuple(spec.get("tolerations", []) or []),
            affinity=spec.get("affinity"),
            priority_class_name=spec.get("priorityClassName"),
            pod_template=spec.get("podTemplate", {}) or {},
        )


def _parse_engine(engine: Mapping[str, Any]) -> EngineSpec:
    spec = engine.get("speculative", {}) or {}
    draft = (spec.get("draft") or {}).get("model")
    return EngineSpec(
        dtype=engine.get("dtype", "auto"),
        max_model_len=engine.get("maxModelLen"),
        max_num_seqs=int(engine.get("maxNumSeqs", 256)),
        max_num_batched_tokens=engine.get("maxNumBatchedTokens"),
        gpu_memory_utilization=float(engine.get("gpuMemoryUtilization", 0.9)),
        block_size=engine.get("blockSize"),
        enforce_eager=engine.get("enforceEager"),
        tensor_parallel_size=int(engine.get("tensorParallelSize", 1)),
        enable_prefix_caching=bool((engine.get("prefixCaching", {}) or {}).get("enabled", True)),
        speculative=SpeculativeSpec(
            method=spec.get("method", "none"),
            num_tokens=int(spec.get("numTokens", 4)),
            disable_by_batch_size=None if spec.get("disableByBatchSize") is None else int(spec["disableByBatchSize"]),
            draft_source=ModelSource.parse(draft["source"], revision=draft.get("revision")) if draft else None,
            draft_lm_head_dtype=(spec.get("draft") or {}).get("lmHeadDtype"),
        ),
    )


def _parse_autoscaling(spec: Mapping[str, Any]) -> AutoscalingSpec:
    min_replicas = int(spec.get("minReplicas", 1))
    return AutoscalingSpec(
        min_replicas=min_replicas,
        max_replicas=int(spec.get("maxReplicas", max(min_replicas, 1))),
        target_queue_depth=float(spec.get("targetQueueDepth", 4)),
        target_kv_cache_usage=float(spec.get("targetKVCacheUsage", 0.85)),
        target_ttft_seconds=spec.get("targetTTFTSeconds"),
        scale_down_delay_seconds=int(spec.get("scaleDownDelaySeconds", 300)),
    )


def _parse_router(spec: Mapping[str, Any]) -> RouterSpec:
    keys = spec.get("apiKeySecretRef")
    return RouterSpec(
        replicas=int(spec.get("replicas", 1)),
        policy=spec.get("policy", "prefix-aware"),
        api_key_secret=SecretKeyRef(keys["name"], keys.get("key", "keys")) if keys else None,
    )


def _parse_resources(spec: Mapping[str, Any]) -> ResourcesSpec:
    return ResourcesSpec(
        gpu_resource_name=spec.get("gpuResourceName", "nvidia.com/gpu"),
        cpu=str(spec["cpu"]) if spec.get("cpu") is not None else None,
        memory=str(spec["memory"]) if spec.get("memory") is not None else None,
        shm_size=str(spec.get("shmSize", "2Gi")),
    )


def desired_replicas(spec: ServiceSpec, current: int | None) -> int:
    """Worker replicas to ask for: the fixed size, or (autoscaled) the autoscaler's choice within bounds.

    With autoscaling, `spec.replicas` is the autoscaler's current choice (it writes it through the scale
    subresource); before its first write the worker Deployment's size, else minReplicas (at least 1, so
    that a new service comes up once before it may scale to zero).
    """
    if spec.autoscaling is None:
        return 1 if spec.replicas is None else int(spec.replicas)
    low, high = spec.autoscaling.min_replicas, spec.autoscaling.max_replicas
    chosen = spec.replicas if spec.replicas is not None else current
    return min(max(max(low, 1) if chosen is None else int(chosen), low), high)
