"""KVCacheManager on a tiny pool (block_size 4, blocks 1..10 usable): exact ids, hits, revival, eviction."""

from infergrid.worker.engine.kv_cache_manager import KVCacheManager
from infergrid.worker.engine.prefix_hash import hash_prompt_blocks
from infergrid.worker.engine.request import Request
from infergrid.worker.sampling_params import SamplingParams

BS = 4


def make_request(req_id: str, tokens: list[int]) -> Request:
    return Request(req_id, tokens, SamplingParams(max_tokens=8))


def admit(kv: KVCacheManager, req: Request) -> int:
    """Prefix lookup + allocation for the whole prompt, then mark it computed (like one prefill step)."""
    hit, num_hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_hit, hit) is not None
    req.num_computed_tokens = req.num_tokens
    kv.cache_computed_blocks(req)
    return num_hit


def free_ids(kv: KVCacheManager) -> list[int]:
    return [b.block_id for b in kv.pool.free_queue]


def test_allocation_gives_exact_blocks_and_grows_one_block_at_a_time():
    kv = KVCacheManager(11, BS)
    req = make_request("a", list(range(10)))
    new = kv.allocate_slots(req, 10)
    assert [b.block_id for b in new] == [1, 2, 3]
    assert kv.get_block_ids(req) == [1, 2, 3]
    req.num_computed_tokens = 10
    assert kv.allocate_slots(req, 2) == []  # slots 10, 11 fit in block 3
    req.num_computed_tokens = 12
    assert [b.block_id for b in kv.allocate_slots(req, 1)] == [4]
    assert kv.get_block_ids(req) == [1, 2, 3, 4]
    assert [b.ref_cnt for b in kv.req_to_blocks["a"]] == [1, 1, 1, 1]


def test_only_full_computed_blocks_are_cached():
    kv = KVCacheManager(11, BS)
    req = make_request("a", list(range(10)))
    kv.allocate_slots(req, 10)
    assert kv.pool.cached_blocks == {}  # allocation alone caches nothing
    req.num_computed_tokens = 10
    kv.cache_computed_blocks(req)
    hashes = hash_prompt_blocks(list(range(10)), BS)
    assert len(hashes) == 2
    assert {k: b.block_id for k, b in kv.pool.cached_blocks.items()} == {hashes[0]: 1, hashes[1]: 2}
    assert kv.req_to_blocks["a"][2].block_hash is None  # partial block 3


def test_prefix_hit_shares_full_blocks_but_not_the_partial_one():
    kv = KVCacheManager(11, BS)
    a = make_request("a", list(range(10)))
    admit(kv, a)
    b = make_request("b", list(range(10)) + [99])
    blocks, num_hit = kv.get_computed_blocks(b)
    assert [blk.block_id for blk in blocks] == [1, 2] and num_hit == 8
    new = kv.allocate_slots(b, b.num_tokens - num_hit, blocks)
    assert [blk.block_id for blk in new] == [4]
    assert kv.get_block_ids(b) == [1, 2, 4]
    assert [blk.ref_cnt for blk in kv.req_to_blocks["a"]] == [2, 2, 1]


def test_whole_prompt_hit_still_leaves_the_last_token_to_compute():
    kv = KVCacheManager(11, BS)
    admit(kv, make_request("a", list(range(8))))
    _, num_hit = kv.get_computed_blocks(make_request("b", list(range(8))))
    assert num_hit == 4
    _, num_hit = kv.get_computed_blocks(make_request("c", list(range(9))))
    assert num_hit == 8


def test_divergent_block_is_a_miss_and_stops_the_match():
    kv = KVCacheManager(11, BS)
    admit(kv, make_request("a", list(range(12)) + [0]))
    tokens = list(range(4)) + [7, 7, 7, 7] + list(range(8, 12)) + [0]
    blocks, num_hit = kv.get_computed_blocks(make_request("b", tokens))
    assert [blk.block_id for blk in blocks] == [1] and num_hit == 4  # block 3 equal but after a miss


def test_partially_matching_last_block_is_a_miss():
    kv = KVCacheManager(11, BS)
    a = make_request("a", list(range(12)) + [0])
    admit(kv, a)  # blocks 1, 2, 3 cached; 4 partial
    b = make_request("b", list(range(10)) + [77, 78, 0])  # block 3 differs in its last 2 tokens
    hit, num_hit = kv.get_computed_blocks(b)
    assert [blk.block_id for blk in hit] == [1, 2] and num_hit == 8
    assert [blk.block_id for blk in kv.allocate_slots(b, b.num_tokens - num_hit, hit)] == [5, 6]
    assert [blk.ref_cnt for blk in kv.req_to_blocks["a"]] == [2, 2, 1, 1]
    # A prompt ending inside block 3 has no hash for that partial block: only full blocks hit.
    _, num_hit = kv.get_computed_blocks(make_request("c", list(range(10))))
    assert num_hit == 8


def test_same_block_content_after_a_different_prefix_is_a_miss():
    kv = KVCacheManager(11, BS)
    admit(kv, make_request("a", [1, 1, 1, 1, 9, 9, 9, 9, 0]))
    assert kv.get_computed_blocks(make_request("b", [2, 2, 2, 2, 9, 9, 9, 9, 0])) == ([], 0)
    hit, num_hit = kv.get_computed_blocks(make_request("c", [1, 1, 1, 1, 9, 9, 9, 9, 5]))
    assert [blk.block_id for blk in hit] == [1, 2] and num_hit == 8


def test_free_returns_blocks_last_first_and_hits_revive_them():
    kv = KVCacheManager(11, BS)
    a = make_request("a", list(range(10)))
    admit(kv, a)
    kv.free(a)
    assert kv.get_block_ids(a) == []
    # Partial block 3 (no hash) goes to the head; cached 2 then 1 go to the tail.
    assert free_ids(kv) == [3, 4, 5, 6, 7, 8, 9, 10, 2, 1]
    b = make_request("b", list(range(10)))
    assert admit(kv, b) == 8
    assert kv.get_block_ids(b) == [1, 2, 3]
    assert free_ids(kv) == [4, 5, 6, 7, 8, 9, 10]
    assert [blk.ref_cnt for blk in kv.req_to_blocks["b"]] == [1, 1, 1]


def test_lru_eviction_order_of_cached_blocks():
    kv = KVCacheManager(7, BS)  # blocks 1..6
    a = make_request("a", list(range(8)) + [0])  # blocks 1,2 cached, 3 partial
    admit(kv, a)
    c = make_request("c", list(range(100, 108)) + [0])  # blocks 4,5 cached, 6 partial
    admit(kv, c)
    kv.free(a)  # queue: 3 | 2 1
    kv.free(c)  # queue: 6 3 | 2 1 5 4
    assert free_ids(kv) == [6, 3, 2, 1, 5, 4]
    d = make_request("d", list(range(200, 216)))  # 4 new blocks: 6, 3, then evicts 2 and 1
    assert [blk.block_id for blk in kv.allocate_slots(d, 16)] == [6, 3, 2, 1]
    assert kv.pool.num_evicted_blocks == 2
    assert kv.get_computed_blocks(make_request("x", list(range(8)) + [0])) == ([], 0)
    hit, num_hit = kv.get_computed_blocks(make_request("y", list(range(100, 108)) + [0]))
    assert [blk.block_id for blk in hit] == [4, 5] and num_hit == 8


def test_allocation_failure_changes_nothing_and_counts_evictable_blocks_as_free():
    kv = KVCacheManager(5, BS)  # blocks 1..4
    a = make_request("a", list(range(8)) + [0])
    admit(kv, a)
    kv.free(a)  # all 4 free; 1, 2 cached and evictable
    big = make_request("big", list(range(50, 70)))
    assert kv.allocate_slots(big, 20) is None  # needs 5 blocks
    assert kv.get_block_ids(big) == [] and kv.pool.get_num_free_blocks() == 4 and "big" not in kv.req_to_blocks
    assert len(kv.pool.cached_blocks) == 2
    assert [blk.block_id for blk in kv.allocate_slots(big, 16)] == [3, 4, 2, 1]
    assert kv.pool.cached_blocks == {}


def test_revived_hit_blocks_are_not_counted_twice_as_free():
    kv = KVCacheManager(5, BS)  # blocks 1..4
    a = make_request("a", list(range(8)) + [0])
    admit(kv, a)
    kv.free(a)
    b = make_request("b", list(range(8)) + list(range(30, 42)))  # 20 tokens, hit 8: needs 3 more blocks
    hit, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8
    assert kv.allocate_slots(b, 12, hit) is None  # 4 free, but 2 of them are the hit blocks
    assert [blk.ref_cnt for blk in hit] == [0, 0] and kv.pool.get_num_free_blocks() == 4
    assert [blk.block_id for blk in kv.allocate_slots(b, 8, hit)] == [3, 4]
    assert kv.get_block_ids(b) == [1, 2, 3, 4]


def test_prefix_caching_disabled():
    kv = KVCacheManager(11, BS, enable_prefix_caching=False)
    a = make_request("a", list(range(10)))
    admit(kv, a)
    assert a.block_hashes == [] and kv.pool.cached_blocks == {}
    assert kv.get_computed_blocks(make_request("b", list(range(10)))) == ([], 0)
    kv.record_prefix_lookup(10, 0)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (0, 0)


def test_counters_count_tokens():
    kv = KVCacheManager(11, BS)
    kv.record_prefix_lookup(10, 0)
    kv.record_prefix_lookup(11, 8)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (21, 8)


def test_blocks_filled_by_decode_tokens_are_cached_too():
    kv = KVCacheManager(11, BS)
    a = make_request("a", list(range(6)))
    admit(kv, a)
    for tok in (50, 51, 52):  # decode: each sampled token is computed the step after
        a.append_output_token_ids(tok)
        assert kv.allocate_slots(a, 1) is not None
        a.num_computed_tokens += 1
        kv.cache_computed_blocks(a)
    assert a.num_computed_tokens == 9
    hit, num_hit = kv.get_computed_blocks(make_request("b", list(range(6)) + [50, 51, 52, 53]))
    assert [blk.block_id for blk in hit] == [1, 2] and num_hit == 8


def test_extra_keys_isolate_otherwise_equal_prompts():
    kv = KVCacheManager(11, BS)
    admit(kv, Request("a", list(range(9)), SamplingParams(), extra_keys=("tenant-a",)))
    same = Request("b", list(range(9)), SamplingParams(), extra_keys=("tenant-a",))
    other = Request("c", list(range(9)), SamplingParams(), extra_keys=("tenant-b",))
    assert kv.get_computed_blocks(same)[1] == 8
    assert kv.get_computed_blocks(other) == ([], 0)
