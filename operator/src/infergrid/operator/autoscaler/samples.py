"""One scrape of a worker's (or router's) Prometheus `/metrics`, reduced to what the decisions read.

A hand-rolled line reader instead of prometheus_client's parser: the operator scrapes every worker every
couple of seconds and needs a handful of series out of a few hundred lines.
"""

from __future__ import annotations

import dataclasses
import math

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
GENERATION_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
REQUEST_SUCCESS = "vllm:request_success_total"
TTFT_BUCKET = "vllm:time_to_first_token_seconds_bucket"
ROUTER_HELD = "infergrid:router_held_requests"


@dataclasses.dataclass(frozen=True)
class WorkerSample:
    """One worker's metrics at `time` (seconds); counters are cumulative since the process started."""

    time: float
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    generation_tokens: float = 0.0
    prompt_tokens: float = 0.0
    finished_requests: float = 0.0
    ttft_buckets: tuple[tuple[float, float], ...] = ()  # (upper bound, cumulative count), ascending

    @property
    def in_flight(self) -> float:
        return self.running + self.waiting

    @property
    def progress(self) -> float:
        """A counter that grows whenever the worker does any work (tokens in or out, requests done)."""
        return self.generation_tokens + self.prompt_tokens + self.finished_requests


def _series(line: str) -> tuple[str, str, float] | None:
    """`name{labels} value [timestamp]` -> (name, labels text, value); None for comments and junk."""
    if not line or line[0] == "#":
        return None
    brace = line.find("{")
    if brace >= 0:
        end = line.rfind("}")
        name, labels, rest = line[:brace], line[brace + 1:end], line[end + 1:]
    else:
        name, _, rest = line.partition(" ")
        labels = ""
    try:
        return name, labels, float(rest.split()[0])
    except (IndexError, ValueError):
        return None


def _le(labels: str) -> float | None:
    start = labels.find('le="')
    if start < 0:
        return None
    value = labels[start + 4:labels.find('"', start + 4)]
    return math.inf if value == "+Inf" else float(value)


def parse_worker_metrics(text: str, time: float) -> WorkerSample:
    """Sum each series over its labels (one model per worker; finish reasons summed)."""
    sums: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        parsed = _series(line)
        if parsed is None:
            continue
        name, labels, value = parsed
        if name == TTFT_BUCKET:
            le = _le(labels)
            if le is not None:
                buckets[le] = buckets.get(le, 0.0) + value
        elif name in (RUNNING, WAITING, KV_USAGE, GENERATION_TOKENS, PROMPT_TOKENS, REQUEST_SUCCESS):
            sums[name] = sums.get(name, 0.0) + value
    return WorkerSample(
        time=time,
        running=sums.get(RUNNING, 0.0),
        waiting=sums.get(WAITING, 0.0),
        kv_usage=sums.get(KV_USAGE, 0.0),
        generation_tokens=sums.get(GENERATION_TOKENS, 0.0),
        prompt_tokens=sums.get(PROMPT_TOKENS, 0.0),
        finished_requests=sums.get(REQUEST_SUCCESS, 0.0),
        ttft_buckets=tuple(sorted(buckets.items())),
    )


def parse_router_held(text: str) -> float:
    """The router's `infergrid:router_held_requests` gauge (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        parsed = _series(line)
        if parsed is not None and parsed[0] == ROUTER_HELD:
            total += parsed[2]
    return total
