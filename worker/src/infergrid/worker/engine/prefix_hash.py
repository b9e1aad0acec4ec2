"""The prefix cache's chained block hashes; the code lives in `infergrid.common.prefix_hash` (pure stdlib,
shared with the router, which ships without torch). This module keeps the engine's import path."""

from infergrid.common.prefix_hash import (
    TEXT_ROOT,
    TOKEN_ROOT,
    BlockHash,
    ExtraKeys,
    extend_block_hashes,
    hash_block_tokens,
    hash_prompt_blocks,
    hash_text_prefix,
)

__all__ = ["TEXT_ROOT", "TOKEN_ROOT", "BlockHash", "ExtraKeys", "extend_block_hashes", "hash_block_tokens",
           "hash_prompt_blocks", "hash_text_prefix"]
