"""EngineStats: a snapshot of queues, KV cache and counters (the source of the /metrics gauges).

The scheduler fills what it keeps (`Scheduler.make_stats`), the engine adds its counters (`LLMEngine.get_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """Counters are totals since start; `last_step_time` is time.monotonic() of the last step."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_total_blocks: int
    num_used_blocks: int
    num_preemptions_total: int
    prefix_cache_queries_total: int
    prefix_cache_hits_total: int
    spec_decode_num_drafts_total: int
    spec_decode_num_draft_tokens_total: int
    spec_decode_num_accepted_tokens_total: int
    # The engine's own counters (the scheduler's snapshot leaves them 0).
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    last_step_time: float = 0.0
    num_steps_total: int = 0
    # Cached (hashed) KV blocks dropped from the prefix cache so the block could be reused, in blocks.
    prefix_cache_evicted_blocks_total: int = 0
    # Speculative decoding: [i] = drafts accepted at draft position i (vLLM's
    # spec_decode_num_accepted_tokens_per_pos); its sum is spec_decode_num_accepted_tokens_total.
    spec_decode_num_accepted_tokens_per_pos: tuple[int, ...] = ()
