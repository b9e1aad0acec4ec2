"""Prometheus metrics with vLLM's names (label `model_name`) plus `infergrid:` extras.

Gauges and counters that the engine already keeps are mirrored from `engine.stats()` at scrape time
by a custom collector (no drift, no background thread). Latency and token-count histograms and the
success counter are observed per request by `RequestTimer`.

Compatibility names checked against vLLM's own `vllm/v1/metrics/loggers.py` (PrometheusStatLogger):
`vllm:gpu_cache_usage_perc` (the deprecated twin of `vllm:kv_cache_usage_perc`, same value),
`vllm:cache_config_info` (a gauge fixed at 1 whose labels are the cache config's fields as strings,
among them `block_size` and `num_gpu_blocks`, plus `engine`), `vllm:request_prompt_tokens` and
`vllm:request_generation_tokens` (histograms per finished request; vLLM's 1-2-5 buckets stop at max_model_len, ours
at 10^6 tokens because the registry exists before the model is loaded: vLLM's are a prefix of ours),
`vllm:time_per_output_token_seconds` (histogram observed per output token after the first, with
vLLM's buckets: the same gaps as `vllm:inter_token_latency_seconds`, as in vLLM v1 of that file).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# (metric name, EngineStats attribute, help)
ENGINE_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("vllm:num_requests_running", "num_running", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "num_waiting", "Number of requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "kv_cache_usage", "KV-cache usage. 1 means 100 percent usage."),
    ("vllm:gpu_cache_usage_perc", "kv_cache_usage",
     "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED: Use vllm:kv_cache_usage_perc instead."),
    ("infergrid:kv_cache_used_blocks", "num_used_blocks", "KV-cache blocks in use."),
    ("infergrid:kv_cache_total_blocks", "num_total_blocks", "KV-cache blocks in the pool."),
)
ENGINE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("vllm:prefix_cache_queries", "prefix_cache_queries_total", "Prefix cache queries, in tokens."),
    ("vllm:prefix_cache_hits", "prefix_cache_hits_total", "Prefix cache hits, in tokens."),
    ("vllm:num_preemptions", "num_preemptions_total", "Cumulative number of preemptions."),
    ("vllm:prompt_tokens", "prompt_tokens_total", "Number of prefill tokens processed."),
    ("vllm:generation_tokens", "generation_tokens_total", "Number of generation tokens processed."),
    ("vllm:spec_decode_num_drafts", "spec_decode_num_drafts_total", "Number of spec decoding drafts."),
    ("vllm:spec_decode_num_draft_tokens", "spec_decode_num_draft_tokens_total", "Number of draft tokens."),
    ("vllm:spec_decode_num_accepted_tokens", "spec_decode_num_accepted_tokens_total",
     "Number of accepted draft tokens."),
    ("infergrid:engine_steps", "num_steps_total", "Engine steps run."),
    ("infergrid:prefix_cache_evicted_blocks", "prefix_cache_evicted_blocks_total",
     "Cached KV blocks evicted from the prefix cache for reuse."),
)

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
MAX_TOKEN_BUCKET = 1_000_000
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
               50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# Grammar compile times: a regex or choice takes ~1 ms, a large JSON schema up to seconds.
GRAMMAR_COMPILE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class ServerGauges:
    """Server-side state the collector exports next to the engine's."""

    num_in_flight: Callable[[], int]
    rejected: Callable[[], dict[str, int]]
    is_ready: Callable[[], bool]
    is_healthy: Callable[[], bool]
    is_draining: Callable[[], bool]
    cache_config: Callable[[], dict[str, str]] = dict
    """vLLM's cache_config_info labels (empty until the engine is loaded)."""


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's token-count buckets)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


class EngineStatsCollector(Collector):
    """Reads `engine.stats()` at scrape time (zeros until the engine is loaded)."""

    def __init__(self, stats: Callable[[], Any | None], model_name: str, server: ServerGauges) -> None:
        self._stats = stats
        self._model_name = model_name
        self._server = server

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        labels = [self._model_name]
        for name, attr, doc in ENGINE_GAUGES:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, float(getattr(stats, attr, 0) or 0))
            yield g
        for name, attr, doc in ENGINE_COUNTERS:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(labels, float(getattr(stats, attr, 0) or 0))
            yield c
        c = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                "Accepted draft tokens by position in the draft (0 = first).",
                                labels=["model_name", "position"])
        for pos, count in enumerate(getattr(stats, "spec_decode_num_accepted_tokens_per_pos", ()) or ()):
            c.add_metric([self._model_name, str(pos)], float(count))
        yield c
        srv = self._server
        info = srv.cache_config()
        if info:
            g = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                  labels=[*info, "model_name"])
            g.add_metric([*info.values(), self._model_name], 1.0)
            yield g
        g = GaugeMetricFamily("infergrid:num_requests_in_flight",
                              "Engine requests admitted by the HTTP server and not finished.",
                              labels=["model_name"])
        g.add_metric(labels, srv.num_in_flight())
        yield g
        c = CounterMetricFamily("infergrid:admission_rejected", "Requests refused at admission.",
                                labels=["model_name", "reason"])
        for reason, count in sorted(srv.rejected().items()):
            c.add_metric([self._model_name, reason], count)
        yield c
        for name, fn, doc in (("infergrid:ready", srv.is_ready, "1 when /ready answers 200."),
                              ("infergrid:healthy", srv.is_healthy, "1 when /health answers 200."),
                              ("infergrid:draining", srv.is_draining, "1 while draining for shutdown.")):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, 1.0 if fn() else 0.0)
            yield g


class LatencyWindow:
    """The most recent samples of one latency, for percentiles in the JSON summary."""

    def __init__(self, maxlen: int = 2048) -> None:
        self._samples: deque[float] = deque(maxlen=maxlen)

    def add(self, value: float) -> None:
        self._samples.append(value)

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile (q in [0, 100]); None when empty."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)
        return ordered[rank]

    def summary(self) -> dict[str, float | int | None]:
        return {"count": len(self._samples), "p50": self.percentile(50), "p95": self.percentile(95),
                "p99": self.percentile(99)}


@dataclass
class ServerMetrics:
    """Per-request metrics of one server (own registry, so several apps can live in one process)."""

    model_name: str
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))
    windows: dict[str, LatencyWindow] = field(default_factory=dict)
    num_finished: dict[str, int] = field(default_factory=dict)
    num_aborted_by_client: int = 0

    def __post_init__(self) -> None:
        r, label = self.registry, ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              label, registry=r, buckets=TTFT_BUCKETS).labels(self.model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             label, registry=r, buckets=ITL_BUCKETS).labels(self.model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency.",
                             label, registry=r, buckets=E2E_BUCKETS).labels(self.model_name)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.",
                              label, registry=r, buckets=TPOT_BUCKETS).labels(self.model_name)
        token_buckets = build_1_2_5_buckets(MAX_TOKEN_BUCKET)
        self.prompt_tokens = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                       label, registry=r, buckets=token_buckets).labels(self.model_name)
        self.generation_tokens = Histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                           label, registry=r, buckets=token_buckets).labels(self.model_name)
        self.queue = Histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent waiting before the first scheduling step.",
                               label, registry=r, buckets=E2E_BUCKETS).labels(self.model_name)
        self.success = Counter("vllm:request_success", "Count of finished requests.",
                               ["model_name", "finished_reason"], registry=r)
        self.client_aborts = Counter("infergrid:client_disconnects", "Requests aborted because the client left.",
                                     label, registry=r).labels(self.model_name)
        self.grammar_compile = Histogram(
            "infergrid:grammar_compile_seconds", "Structured output: time to compile a grammar (cache misses).",
            label, registry=r, buckets=GRAMMAR_COMPILE_BUCKETS).labels(self.model_name)
        self.constrained_requests = Counter(
            "infergrid:structured_output_requests", "Requests whose output follows a grammar, by constraint kind.",
            ["model_name", "kind"], registry=r)
        for name in ("ttft", "itl", "e2e", "queue"):
            self.windows[name] = LatencyWindow()
        for reason in ("stop", "length", "abort"):  # export the common series from the first scrape
            self.success.labels(self.model_name, reason)

    def observe(self, name: str, value: float) -> None:
        """Record one latency sample (histogram + window)."""
        getattr(self, name).observe(value)
        self.windows[name].add(value)

    def finished(self, reason: str | None) -> None:
        """Count one finished sequence by its finish reason."""
        key = reason or "abort"
        self.success.labels(self.model_name, key).inc()
        self.num_finished[key] = self.num_finished.get(key, 0) + 1

    def summary(self) -> dict[str, Any]:
        """Latency percentiles (seconds) and finish counts for /v1/metrics."""
        return {"latency_s": {k: w.summary() for k, w in self.windows.items()},
                "requests_finished": dict(self.num_finished),
                "client_disconnects": self.num_aborted_by_client}


class RequestTimer:
    """Observes one engine request's outputs: TTFT, inter-token gaps, queue time, e2e, finish reasons."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self._last_token_time: float | None = None
        self._num_tokens = 0
        self._is_done = False

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival

    def on_output(self, out: Any) -> None:
        """Call with every RequestOutput the engine yields."""
        now = time.monotonic()
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        if num_tokens > self._num_tokens:
            if self.first_token_time is None:
                self.first_token_time = now
                self._metrics.observe("ttft", now - self.arrival)
                self._metrics.observe("queue", self._queue_time(out, now))
            else:
                gap = now - (self._last_token_time or now)
                self._metrics.observe("itl", gap)
                self._metrics.tpot.observe(gap)
            self._last_token_time = now
            self._num_tokens = num_tokens
        if out.finished and not self._is_done:
            self._is_done = True
            self._metrics.observe("e2e", now - self.arrival)
            self._metrics.prompt_tokens.observe(len(out.prompt_token_ids))
            for c in out.outputs:
                self._metrics.finished(c.finish_reason)
                self._metrics.generation_tokens.observe(len(c.token_ids))

    def on_abort(self, *, by_client: bool) -> None:
        """The request ended without finishing (client left, shutdown or error)."""
        if self._is_done:
            return
        self._is_done = True
        self._metrics.finished("abort")
        if by_client:
            self._metrics.num_aborted_by_client += 1
            self._metrics.client_aborts.inc()

    def _queue_time(self, out: Any, now: float) -> float:
        """Engine-reported time from arrival to first scheduling when available, else the time to
        the first token (an upper bound)."""
        m = getattr(out, "metrics", None)
        arrival = getattr(m, "arrival_time", None)
        scheduled = getattr(m, "first_scheduled_time", None)
        if isinstance(arrival, float) and isinstance(scheduled, float) and scheduled >= arrival:
            return scheduled - arrival
        return now - self.arrival
