"""KVCacheManager: per-request block tables on top of the BlockPool; prefix-cache lookups and caching.

A request's block table maps its token positions to KV slots (block_size 4 here):

    positions:    0  1  2  3 | 4  5  6  7 | 8  9
    block table: [    7      |     2      |  9   ]   slot(p) = table[p // 4] * 4 + p % 4
                  full,      | full,      | partial: never hashed, never shared
                  hash h0    | hash h1 = H(h0, tokens 4..7)

Prefix hits share full blocks between requests (ref_cnt > 1). Tables only grow, one block at a time,
as tokens are scheduled; a request never holds more than ceil(tokens / block_size) blocks plus the
slots of scheduled speculative tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from infergrid.worker.engine.block_pool import BlockPool, KVCacheBlock
from infergrid.worker.engine.prefix_hash import extend_block_hashes
from infergrid.worker.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Allocates and frees a request's blocks and finds/records cached prefixes.

    NOTE: a block is hashed and entered in the prefix cache only after its tokens' KV was computed
    (`cache_computed_blocks`, called once a step's output is in), never at allocation time, so a hit
    can never point at KV that a failed or not-yet-run step was supposed to write.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_to_block_ids: dict[str, list[int]] = {}
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    @property
    def num_usable_blocks(self) -> int:
        return self.pool.num_usable_blocks

    def get_usage(self) -> float:
        return self.pool.get_usage()

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of the request's tokens: (blocks, number of tokens they cover).

        At most num_tokens - 1 tokens are reused, so the last token is always computed (its logits
        produce the next token). Nothing is referenced or counted yet: pass the blocks to
        `allocate_slots`, and call `record_prefix_lookup` once the request is admitted.
        """
        if not self.enable_prefix_caching:
            return [], 0
        hashes = extend_block_hashes(
            request.block_hashes, request.all_token_ids, self.block_size, extra_keys=request.extra_keys
        )
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[KVCacheBlock] = []
        for block_hash in hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one lookup whose result was used (in tokens, as vLLM's prefix_cache_* counters)."""
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += num_hit_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
    ) -> list[KVCacheBlock] | None:
        """Make room for `num_new_tokens` more tokens after the request's computed (plus newly hit) ones.

        `new_computed_blocks` (from `get_computed_blocks`, for a request not yet holding blocks) are
        referenced and prepended. Returns the newly allocated blocks, or None (and changes nothing)
        when the pool cannot supply them even after evicting unreferenced cached blocks.
        """
        req_id = request.request_id
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_required = cdiv(num_computed + num_new_tokens, self.block_size)
        num_held = len(self.req_to_blocks.get(req_id, ()))
        if num_required <= num_held and not new_computed_blocks:
            return []  # the common decode case: the last block still has room
        num_new_blocks = max(0, num_required - num_held - len(new_computed_blocks))
        # Hit blocks sitting in the free queue stop being free once referenced.
        num_revived = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.pool.get_num_free_blocks() - num_revived:
            return None
        blocks = self.req_to_blocks.setdefault(req_id, [])
        block_ids = self.req_to_block_ids.setdefault(req_id, [])
        if new_computed_blocks:
            assert not blocks, "prefix hits only for a request without blocks"
            self.pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
            self.num_cached_blocks[req_id] = len(new_computed_blocks)
        new_blocks = self.pool.get_new_blocks(num_new_blocks)
        blocks.extend(new_blocks)
        block_ids.extend([b.block_id for b in new_computed_blocks] + [b.block_id for b in new_blocks])
        return new_blocks

    def cache_computed_blocks(self, request: Request) -> None:
        """Hash and cache the request's blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        req_id = request.request_id
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        num_cached = self.num_cached_blocks.get(req_id, 0)
        if num_full <= num_cached:
            return
        hashes = extend_block_hashes(
            request.block_hashes, request.all_token_ids, self.block_size, num_full * self.block_size,
            extra_keys=request.extra_keys,
        )
        blocks = self.req_to_blocks[req_id]
        for i in range(num_cached, num_full):
            self.pool.cache_block(blocks[i], hashes[i])
        self.num_cached_blocks[req_id] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks, last block first (so a prefix outlives its continuations)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.req_to_block_ids.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        self.pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request: Request) -> list[int]:
        """The request's block table (a live list owned by the manager: do not mutate)."""
        return self.req_to_block_ids.get(request.request_id, [])

    def get_num_blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)
