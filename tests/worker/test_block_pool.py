"""BlockPool: exact block ids, ref counts, free-queue (LRU) order, hash eviction and revival."""

import pytest

from infergrid.worker.engine.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock


def free_ids(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.free_queue]


def h(n: int) -> bytes:
    return bytes([n]) * 32


def test_block_zero_is_reserved_and_the_rest_start_free_in_id_order():
    pool = BlockPool(6)
    assert free_ids(pool) == [1, 2, 3, 4, 5]
    assert pool.num_usable_blocks == 5 and pool.get_num_free_blocks() == 5
    assert pool.null_block.block_id == 0 and pool.null_block.ref_cnt == 1
    assert pool.get_usage() == 0.0
    with pytest.raises(ValueError, match="num_blocks must be >= 2"):
        BlockPool(1)


def test_allocation_pops_from_the_head_with_ref_cnt_one():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [1, 2, 3]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert free_ids(pool) == [4, 5]
    assert pool.get_usage() == pytest.approx(0.6)
    with pytest.raises(ValueError, match="cannot allocate 3 blocks, 2 free"):
        pool.get_new_blocks(3)
    assert free_ids(pool) == [4, 5]


def test_freed_blocks_go_to_the_tail_in_the_given_order():
    pool = BlockPool(6)
    a, b, c = pool.get_new_blocks(3)
    for blk, n in ((a, 1), (b, 2), (c, 3)):
        assert pool.cache_block(blk, h(n))
    pool.free_blocks([c, b, a])  # a request frees its last block first
    assert free_ids(pool) == [4, 5, 3, 2, 1]
    # The next allocations consume never-cached blocks first, then the LRU cached ones.
    assert [blk.block_id for blk in pool.get_new_blocks(3)] == [4, 5, 3]


def test_uncached_freed_blocks_go_to_the_head():
    pool = BlockPool(6)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, h(1))
    pool.free_blocks([b, a])  # b (partial, no hash) is worthless: reuse it first
    assert free_ids(pool) == [2, 3, 4, 5, 1]


def test_shared_block_is_freed_only_when_the_last_reference_drops():
    pool = BlockPool(4)
    (a,) = pool.get_new_blocks(1)
    pool.cache_block(a, h(1))
    pool.touch([a])
    assert a.ref_cnt == 2
    pool.free_blocks([a])
    assert a.ref_cnt == 1 and free_ids(pool) == [2, 3]
    pool.free_blocks([a])
    assert a.ref_cnt == 0 and free_ids(pool) == [2, 3, 1]
    with pytest.raises(AssertionError, match="double free"):
        pool.free_blocks([a])


def test_cached_free_block_is_revived_from_the_middle_of_the_queue():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(5)
    for i, blk in enumerate(blocks):
        pool.cache_block(blk, h(i))
    pool.free_blocks(blocks)
    assert free_ids(pool) == [1, 2, 3, 4, 5]
    hit = pool.get_cached_block(h(2))
    assert hit is blocks[2] and hit.ref_cnt == 0
    pool.touch([hit])
    assert hit.ref_cnt == 1 and hit.block_hash == h(2)
    assert free_ids(pool) == [1, 2, 4, 5]
    assert pool.get_num_free_blocks() == 4


def test_popping_a_cached_block_evicts_its_hash():
    pool = BlockPool(3)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, h(1))
    pool.cache_block(b, h(2))
    pool.free_blocks([b, a])
    assert free_ids(pool) == [2, 1]
    (reused,) = pool.get_new_blocks(1)
    assert reused is b and reused.block_hash is None
    assert pool.get_cached_block(h(2)) is None
    assert pool.get_cached_block(h(1)) is a


def test_cache_block_refuses_duplicates_and_recaching():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    assert pool.cache_block(a, h(1))
    assert not pool.cache_block(a, h(2))  # already cached under h(1)
    assert not pool.cache_block(b, h(1))  # another block holds h(1)
    assert b.block_hash is None and pool.get_cached_block(h(1)) is a


def test_caching_disabled_never_hashes():
    pool = BlockPool(4, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    assert not pool.cache_block(a, h(1))
    assert a.block_hash is None and pool.cached_blocks == {}


def test_reset_prefix_cache_only_when_idle():
    pool = BlockPool(4)
    (a,) = pool.get_new_blocks(1)
    pool.cache_block(a, h(1))
    assert not pool.reset_prefix_cache()
    pool.free_blocks([a])
    assert pool.reset_prefix_cache()
    assert pool.get_cached_block(h(1)) is None and a.block_hash is None


def test_free_queue_is_a_doubly_linked_list():
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    q.remove(blocks[0])
    q.remove(blocks[4])
    assert [b.block_id for b in q] == [1, 3] and len(q) == 2
    q.appendleft(blocks[4])
    q.append(blocks[0])
    assert [b.block_id for b in q] == [4, 1, 3, 0]
    assert q.popleft() is blocks[4]
    assert [q.popleft().block_id for _ in range(3)] == [1, 3, 0]
    with pytest.raises(ValueError, match="no free blocks"):
        q.popleft()


def test_evictions_count_only_cached_blocks_reused():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, h(1))
    pool.free_blocks([b, a])  # queue: b (no hash) at the head, then 3, then a
    pool.get_new_blocks(2)  # b and 3: nothing evicted
    assert pool.num_evicted_blocks == 0
    pool.get_new_blocks(1)  # a: its hash goes
    assert pool.num_evicted_blocks == 1 and pool.cached_blocks == {}
