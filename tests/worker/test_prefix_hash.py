"""Chained block hashes: full blocks only, chaining, stability, and the text-chunk variant."""

import pytest

from infergrid.common.prefix_hash import (
    extend_block_hashes,
    hash_block_tokens,
    hash_prompt_blocks,
    hash_text_prefix,
)

# sha256(sha256(b"infergrid:token-blocks:v1") + pack("<I4q", 4, 1, 2, 3, 4)), computed independently
GOLDEN_FIRST_BLOCK = "6a95b62d2bb5895d"


def test_only_full_blocks_are_hashed():
    assert len(hash_prompt_blocks(list(range(11)), block_size=4)) == 2
    assert len(hash_prompt_blocks(list(range(12)), block_size=4)) == 3
    assert hash_prompt_blocks([1, 2, 3], block_size=4) == []


def test_hashes_chain_through_the_parent():
    h = hash_prompt_blocks([1, 2, 3, 4, 5, 6, 7, 8], block_size=4)
    assert h[0] == hash_block_tokens(None, [1, 2, 3, 4])
    assert h[1] == hash_block_tokens(h[0], [5, 6, 7, 8])
    assert all(isinstance(x, bytes) and len(x) == 32 for x in h)


def test_same_block_after_a_different_prefix_does_not_collide():
    a = hash_prompt_blocks([1, 1, 1, 1, 9, 9, 9, 9], block_size=4)
    b = hash_prompt_blocks([2, 2, 2, 2, 9, 9, 9, 9], block_size=4)
    assert a[1] != b[1]
    assert hash_block_tokens(None, [9, 9, 9, 9]) not in (a[1], b[1])


def test_common_prefix_shares_leading_hashes_then_diverges():
    a = hash_prompt_blocks(list(range(12)), block_size=4)
    b = hash_prompt_blocks(list(range(8)) + [0, 0, 0, 0], block_size=4)
    assert a[:2] == b[:2] and a[2] != b[2]


def test_token_serialisation_is_unambiguous_and_order_sensitive():
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [258])
    assert hash_block_tokens(None, [1]) != hash_block_tokens(None, [1, 0])


def test_extra_keys_change_the_hash():
    tokens = [1, 2, 3, 4]
    plain = hash_prompt_blocks(tokens, 4)
    salted = hash_prompt_blocks(tokens, 4, extra_keys=("tenant-a",))
    assert plain != salted
    assert salted == hash_prompt_blocks(tokens, 4, extra_keys=("tenant-a",))
    assert salted != hash_prompt_blocks(tokens, 4, extra_keys=("tenant-b",))


def test_stable_across_processes_golden_value():
    # The router and every worker must agree: pin the canonical serialisation.
    assert hash_prompt_blocks([1, 2, 3, 4], block_size=4)[0].hex()[:16] == GOLDEN_FIRST_BLOCK



def test_incremental_extension_equals_full_hashing():
    tokens = list(range(100, 123))
    hashes = []
    extend_block_hashes(hashes, tokens[:5], 4)
    assert len(hashes) == 1
    extend_block_hashes(hashes, tokens, 4, num_tokens=16)
    assert len(hashes) == 4
    extend_block_hashes(hashes, tokens, 4)
    assert hashes == hash_prompt_blocks(tokens, 4)


def test_text_prefix_chunks():
    text = "a" * 10 + "b" * 10 + "c" * 5
    h = hash_text_prefix(text, chunk_chars=10)
    assert len(h) == 2
    assert h[:1] == hash_text_prefix("a" * 10 + "x" * 10, chunk_chars=10)[:1]
    assert h[1] != hash_text_prefix("z" * 10 + "b" * 10, chunk_chars=10)[1]
    assert hash_text_prefix(text, chunk_chars=10, max_chunks=1) == h[:1]
    assert hash_text_prefix("héllo wörld ☃", chunk_chars=4)  # non-ASCII is fine


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="block_size"):
        hash_prompt_blocks([1], block_size=0)
    with pytest.raises(ValueError, match="chunk_chars"):
        hash_text_prefix("abc", chunk_chars=0)
