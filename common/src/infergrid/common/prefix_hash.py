"""Chained block hashes: the keys of the prefix cache (and of the router's prefix-aware policy).

Block i's hash covers block i's tokens AND, through its parent, every token before it:

    tokens:  [t0 .. t15][t16 .. t31][t32 .. t40]      (block_size 16; the last block is partial)
    hashes:   h0 = H(ROOT, t0..t15)
              h1 = H(h0,   t16..t31)                  only FULL blocks get a hash
    equal h1  <=>  equal first 32 tokens (and equal extra keys)

So the same block content after a different prefix gets a different hash, and looking up hashes
left to right finds the longest cached prefix. H is sha256 over a canonical byte layout
(32-byte parent digest, token count, tokens as little-endian int64, repr of the extra keys), so
hashes are stable across processes and machines (a router and a worker compute the same values).

For a router (prefix-aware policy) -- this module is pure stdlib, importing it does not load torch:

    from infergrid.common.prefix_hash import hash_prompt_blocks
    token_ids = tokenizer(prompt)["input_ids"]            # exactly the ids the worker will see
    keys = hash_prompt_blocks(token_ids, block_size=16)   # the workers' --block-size
    route_key = keys[min(len(keys), 4) - 1] if keys else None   # e.g. hash of the first <= 4 blocks

`keys[i]` equals the worker's prefix-cache key for the first (i + 1) * block_size tokens, so two
prompts with equal `keys[i]` share that much cached KV on one worker. The ids must be the worker's:
same tokenizer, BOS included as the tokenizer adds it; chat requests rendered and tokenized as
`infergrid.worker.tokenizer.apply_chat_template` does (what the server uses); no extra keys (the
worker passes none today). A router without the tokenizer can use `hash_text_prefix` on the raw
prompt text: its keys are not the worker's, but equal leading text still gives equal keys (good
enough for affinity).
NOTE: the byte layout is versioned by the root tags (`...:v1`); change a tag whenever it changes,
and update the golden value in tests/worker/test_prefix_hash.py.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes
"""A 32-byte sha256 digest."""

TOKEN_ROOT: BlockHash = hashlib.sha256(b"infergrid:token-blocks:v1").digest()
TEXT_ROOT: BlockHash = hashlib.sha256(b"infergrid:text-chunks:v1").digest()

ExtraKeys = tuple[str | int, ...]
"""Anything besides the tokens that changes the KV (e.g. a per-tenant cache salt)."""


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_keys: ExtraKeys | None = None
) -> BlockHash:
    """Hash one block: its parent's hash (None for the first block), its tokens and extra keys."""
    h = hashlib.sha256(TOKEN_ROOT if parent_hash is None else parent_hash)
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    if extra_keys:
        h.update(repr(tuple(extra_keys)).encode())
    return h.digest()


def extend_block_hashes(
    block_hashes: list[BlockHash],
    token_ids: Sequence[int],
    block_size: int,
    num_tokens: int | None = None,
    extra_keys: ExtraKeys | None = None,
) -> list[BlockHash]:
    """Append the hashes of the full blocks of `token_ids[:num_tokens]` not yet in `block_hashes`.

    `block_hashes` must hold the hashes of the first blocks of the same tokens (it is a per-request
    cache that grows as tokens are computed). Returns `block_hashes`.
    """
    end = len(token_ids) if num_tokens is None else num_tokens
    parent = block_hashes[-1] if block_hashes else None
    for i in range(len(block_hashes), end // block_size):
        parent = hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size], extra_keys)
        block_hashes.append(parent)
    return block_hashes


def hash_prompt_blocks(
    token_ids: Sequence[int], block_size: int = 16, extra_keys: ExtraKeys | None = None
) -> list[BlockHash]:
    """The chained hashes of every full block of a prompt, in order (a trailing partial block has none).

    These equal the keys the worker's prefix cache uses for the same tokens and block size, so a
    router can send prompts with a common prefix to the worker that holds it.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return extend_block_hashes([], token_ids, block_size, extra_keys=extra_keys)


def hash_text_prefix(text: str, chunk_chars: int = 256, max_chunks: int | None = None) -> list[BlockHash]:
    """Chained hashes of the full `chunk_chars`-character chunks of `text` (for callers without the
    tokenizer, e.g. a router hashing raw prompts). Not interchangeable with token block hashes."""
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    num_chunks = len(text) // chunk_chars
    if max_chunks is not None:
        num_chunks = min(num_chunks, max_chunks)
    hashes: list[BlockHash] = []
    parent = TEXT_ROOT
    for i in range(num_chunks):
        chunk = text[i * chunk_chars : (i + 1) * chunk_chars].encode("utf-8", "surrogatepass")
        parent = hashlib.sha256(parent + struct.pack("<I", len(chunk)) + chunk).digest()
        hashes.append(parent)
    return hashes
