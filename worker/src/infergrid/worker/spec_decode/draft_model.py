"""The draft model: a smaller checkpoint with the target's tokenizer, on a ModelRunner of its own.

The draft runs on the engine's own machinery, used through the runner's public methods only: its
model, paged KV cache, attention backend and CUDA graphs. Its KV pool mirrors the target's block ids
(given to `initialize_kv_cache`), so the draft reads and writes a request's KV through the target's
block table (draft_kv.py tracks which of it is valid):

    draft KV pool: [ block 0 (null) | blocks 1 .. N-1 (same ids as the target) | scratch blocks ]

Draft KV at positions past the target's computed tokens is speculative: it goes to the request's own
(uncached, unshared) blocks or, past the end of its block table, to scratch blocks.

Its runner captures, into one memory pool: decode graphs (passes 2..k), graphs of up to k + 2 query
tokens per request (pass 1: the last computed token, the accepted drafts and the bonus), the draft
loop graph (passes 2..k of a greedy step, LM heads and argmaxes included: draft_loop_graph.py) and
the ahead graph (a whole steady-state proposal made ahead: ahead_graph.py).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from infergrid.worker.config import DEFAULT_SPECULATIVE_DISABLE_BY_BATCH_SIZE, EngineConfig
from infergrid.worker.engine.request import Request
from infergrid.worker.engine.scheduler_output import ScheduledRequest
from infergrid.worker.loader import resolve_model_path
from infergrid.worker.model_config import ModelConfig
from infergrid.worker.runner.kv_cache import kv_block_bytes
from infergrid.worker.runner.model_runner import ModelRunner
from infergrid.worker.sample.sampler import Sampler
from infergrid.worker.spec_decode.ahead_graph import AheadGraphRunner
from infergrid.worker.spec_decode.draft_kv import DraftKVValidity
from infergrid.worker.spec_decode.draft_loop_graph import DraftLoopGraphRunner

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class DraftModel:
    """The draft checkpoint, its runner, KV validity, graphs and per-request generators.

    Args:
        config: the engine's config (draft_model, draft_lm_head_dtype, num_speculative_tokens,
            block_size, max_num_seqs).
        target: the target's ModelRunner (device, dtype, vocabulary, context length).
    """

    def __init__(self, config: EngineConfig, target: ModelRunner) -> None:
        assert config.draft_model is not None  # EngineConfig checks
        path = resolve_model_path(config.draft_model, cache_dir=config.model_cache_dir)
        self.model_config = ModelConfig.from_pretrained(path)
        target_cfg = target.model_config
        if self.model_config.vocab_size != target_cfg.vocab_size:
            raise ValueError(
                f"draft_model vocabulary ({self.model_config.vocab_size} tokens) differs from the target's "
                f"({target_cfg.vocab_size}); the draft must share the target's tokenizer"
            )
        if self.model_config.max_position_embeddings < target.max_model_len:
            raise ValueError(
                f"draft_model max_position_embeddings {self.model_config.max_position_embeddings} is below "
                f"max_model_len {target.max_model_len}"
            )
        self.block_size = config.block_size
        self.max_k = config.num_speculative_tokens
        # Per proposing request: room past its table for a proposal made ahead, whose pass 1 writes k + 1
        # sampled tokens (padded to k + 1) and passes 2..k write up to k - 1 more.
        self.num_scratch_per_request = -(-2 * self.max_k // self.block_size) + 1
        self.num_scratch_blocks = config.max_num_seqs * self.num_scratch_per_request
        dtype = config.dtype if config.dtype != "auto" else _DTYPE_NAMES.get(target.dtype, "auto")
        draft_config = dataclasses.replace(
            config, model=path, dtype=dtype, speculative_method=None, num_speculative_tokens=0,
            draft_model=None, draft_lm_head_dtype=None, tensor_parallel_size=1,
            speculative_disable_by_batch_size=DEFAULT_SPECULATIVE_DISABLE_BY_BATCH_SIZE,
        )
        self.runner = ModelRunner(draft_config, path, self.model_config, target.max_model_len, target.eos_token_ids,
                                  lm_head_dtype=config.draft_lm_head_dtype)
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}
        self.kv = DraftKVValidity(self.block_size)
        self.num_target_blocks = 0  # the first scratch block's id
        # Tokens a pass may catch up (bounds the draft's activation memory like the target's budget).
        self.max_catch_up_tokens = config.get_max_num_batched_tokens()
        self.num_catch_up_tokens_total = 0  # tokens the draft computed to catch up with the target
        self.loop_graphs: DraftLoopGraphRunner | None = None  # with CUDA graphs (draft_loop_graph.py)
        self.ahead_graphs: AheadGraphRunner | None = None  # with CUDA graphs (ahead_graph.py)

    def kv_block_bytes(self) -> int:
        """Bytes of one draft KV block (the target sizes its pool for both)."""
        return kv_block_bytes(self.model_config, self.block_size, self.runner.dtype)

    def initialize_kv_cache(self, num_target_blocks: int) -> None:
        """Allocate the draft pool: the target's block ids plus scratch blocks; capture the graphs."""
        self.num_target_blocks = num_target_blocks
        self.kv.reset(num_target_blocks)
        runner = self.runner
        plan = runner.graph_plan(max_query_len=self.max_k + 2)
        runner.initialize_kv_cache(plan, num_blocks=num_target_blocks + self.num_scratch_blocks)
        if plan.has_graphs:
            if self.max_k > 1:  # passes 2..k of greedy steps in one replay
                self.loop_graphs = runner.add_graphs(DraftLoopGraphRunner(runner, self.max_k, pool=runner.graph_pool))
            # Steady-state proposals made ahead, in one replay.
            self.ahead_graphs = runner.add_graphs(AheadGraphRunner(runner, self.max_k, pool=runner.graph_pool))

    def remove_requests(self, request_ids: set[str]) -> None:
        for req_id in request_ids:
            self.generators.pop(req_id, None)

    def generator(self, request_id: str, seed: int) -> torch.Generator:
        """A seeded request's draft generator: its own stream, apart from the target's."""
        gen = self.generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.runner.device)
            gen.manual_seed(seed ^ 0x5EED)
            self.generators[request_id] = gen
        return gen

    @staticmethod
    def sched(request: Request, start: int, token_ids: list[int], block_ids: list[int],
              needs_sample: bool) -> ScheduledRequest:
        """A draft pass's scheduled request: `token_ids` at positions start.. through `block_ids`."""
        return ScheduledRequest(
            request=request, num_computed_tokens=start, num_new_tokens=len(token_ids), token_ids=token_ids,
            spec_token_ids=[], block_ids=block_ids, is_prefill=len(token_ids) > 1, needs_sample=needs_sample,
        )
