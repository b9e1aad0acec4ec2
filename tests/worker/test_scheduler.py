"""Scheduler on tiny configs: token budget, chunked prefill, ordering, deadlines, preemption, stops, spec."""

import itertools

import pytest

from infergrid.worker.config import EngineConfig
from infergrid.worker.engine.request import Request, RequestStatus
from infergrid.worker.engine.scheduler import Scheduler
from infergrid.worker.engine.scheduler_output import SchedulerOutput
from infergrid.worker.sampling_params import SamplingParams

BS = 4
EOS = 2
_prompt_starts = itertools.count(1000, 1000)  # distinct prompts unless a test shares one on purpose


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(
    num_blocks: int = 21,
    max_model_len: int = 64,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    enable_prefix_caching: bool = True,
    clock: FakeClock | None = None,
) -> Scheduler:
    config = EngineConfig(
        model="unused",
        block_size=BS,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_prefix_caching=enable_prefix_caching,
    )
    return Scheduler(config, num_blocks, max_model_len, eos_token_ids={EOS}, clock=clock or FakeClock())


def make_request(
    req_id: str,
    num_prompt: int = 6,
    max_tokens: int | None = 8,
    first_token: int | None = None,
    priority: int = 0,
    arrival: float = 0.0,
    deadline: float | None = None,
    **params,
) -> Request:
    start = next(_prompt_starts) if first_token is None else first_token
    tokens = list(range(start, start + num_prompt))
    sp = SamplingParams(max_tokens=max_tokens, **params)
    return Request(req_id, tokens, sp, priority=priority, arrival_time=arrival, deadline=deadline)


def plan(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request_id, s.num_new_tokens) for s in out.scheduled]


def step(sched: Scheduler, token: int = 7, sampled: dict | None = None):
    """One engine step with a fake runner that samples `token` for every request that samples."""
    out = sched.schedule()
    if sampled is None:
        sampled = {s.request_id: [token] for s in out.scheduled if s.needs_sample}
    return out, sched.update_from_output(out, sampled)


# -- the basic prefill -> decode path -------------------------------------------------------------


def test_prefill_then_decode():
    sched = make_scheduler()
    req = make_request("a", num_prompt=6, first_token=100)
    sched.add_request(req)
    out = sched.schedule()
    (s,) = out.scheduled
    assert (s.num_computed_tokens, s.num_new_tokens, s.block_ids) == (0, 6, [1, 2])
    assert s.token_ids == list(range(100, 106)) and s.is_prefill and s.needs_sample
    assert out.num_batched_tokens == 6 and req.status == RequestStatus.RUNNING
    assert sched.update_from_output(out, {"a": [7]}) == []
    assert req.output_token_ids == [7] and req.num_computed_tokens == 6
    out = sched.schedule()
    (s,) = out.scheduled
    assert (s.num_computed_tokens, s.num_new_tokens, s.token_ids) == (6, 1, [7])
    assert not s.is_prefill and s.needs_sample and s.block_ids == [1, 2]


def test_runs_to_max_tokens_and_frees_blocks():
    sched = make_scheduler()
    req = make_request("a", num_prompt=6, max_tokens=3)
    sched.add_request(req)
    finished = []
    for _ in range(3):
        finished += step(sched)[1]
    assert finished == [req]
    assert req.status == RequestStatus.FINISHED_LENGTH and req.finish_reason == "length"
    assert req.output_token_ids == [7, 7, 7]
    assert not sched.has_unfinished_requests() and sched.make_stats().num_used_blocks == 0
    assert sched.schedule().finished_req_ids == {"a"}


def test_chunked_prefill_samples_only_after_the_last_chunk():
    sched = make_scheduler(max_num_batched_tokens=8)
    req = make_request("a", num_prompt=20)
    sched.add_request(req)
    chunks = []
    for _ in range(3):
        out = sched.schedule()
        (s,) = out.scheduled
        chunks.append((s.num_computed_tokens, s.num_new_tokens, s.needs_sample, len(s.block_ids)))
        sched.update_from_output(out, {"a": [7]})  # a token for a partial chunk is ignored
    assert chunks == [(0, 8, False, 2), (8, 8, False, 4), (16, 4, True, 5)]
    assert req.output_token_ids == [7] and req.num_computed_tokens == 20


def test_budget_is_split_between_decodes_and_a_chunked_prefill():
    sched = make_scheduler(max_num_batched_tokens=10)
    sched.add_request(make_request("a", num_prompt=4, arrival=0))
    sched.add_request(make_request("b", num_prompt=4, arrival=1))
    assert plan(step(sched)[0]) == [("a", 4), ("b", 4)]
    sched.add_request(make_request("c", num_prompt=20, arrival=2))
    out, _ = step(sched)
    assert plan(out) == [("a", 1), ("b", 1), ("c", 8)] and out.num_batched_tokens == 10
    assert plan(step(sched)[0]) == [("a", 1), ("b", 1), ("c", 8)]
    assert plan(step(sched)[0]) == [("a", 1), ("b", 1), ("c", 4)]


def test_max_num_seqs_caps_the_batch():
    sched = make_scheduler(max_num_seqs=2)
    for i, name in enumerate("abc"):
        sched.add_request(make_request(name, max_tokens=2, arrival=i))
    assert plan(step(sched)[0]) == [("a", 6), ("b", 6)]
    out, finished = step(sched)
    assert plan(out) == [("a", 1), ("b", 1)] and {r.request_id for r in finished} == {"a", "b"}
    assert plan(step(sched)[0]) == [("c", 6)]


# -- ordering --------------------------------------------------------------------------------------


def test_waiting_requests_are_admitted_in_priority_order():
    sched = make_scheduler(max_num_seqs=1)
    for name, prio, arrival in (("low", 2, 0.0), ("high", 0, 1.0), ("mid", 1, 2.0)):
        sched.add_request(make_request(name, max_tokens=1, priority=prio, arrival=arrival))
    assert [plan(step(sched)[0]) for _ in range(3)] == [[("high", 6)], [("mid", 6)], [("low", 6)]]


def test_same_priority_is_served_by_arrival():
    sched = make_scheduler(max_num_batched_tokens=18)
    for name, arrival in (("c", 3.0), ("a", 1.0), ("b", 2.0)):
        sched.add_request(make_request(name, arrival=arrival))
    assert plan(sched.schedule()) == [("a", 6), ("b", 6), ("c", 6)]


def test_earliest_deadline_breaks_ties_within_a_priority():
    sched = make_scheduler(max_num_seqs=1)
    sched.add_request(make_request("none", max_tokens=1, arrival=0.0))
    sched.add_request(make_request("late", max_tokens=1, arrival=1.0, deadline=50.0))
    sched.add_request(make_request("soon", max_tokens=1, arrival=2.0, deadline=10.0))
    sched.add_request(make_request("urgent", max_tokens=1, arrival=3.0, priority=-1))
    order = [plan(step(sched)[0])[0][0] for _ in range(4)]
    assert order == ["urgent", "soon", "late", "none"]


def test_running_requests_are_batched_in_priority_order():
    sched = make_scheduler()
    sched.add_request(make_request("b", priority=1, arrival=0.0))
    step(sched)
    sched.add_request(make_request("a", priority=0, arrival=1.0))
    step(sched)
    assert plan(sched.schedule()) == [("a", 1), ("b", 1)]


# -- deadlines -------------------------------------------------------------------------------------


def test_waiting_request_past_its_deadline_finishes_instead_of_running():
    clock = FakeClock()
    sched = make_scheduler(max_num_seqs=1, clock=clock)
    sched.add_request(make_request("busy", max_tokens=4))
    step(sched)
    sched.add_request(make_request("sla", deadline=1.5, arrival=0.5))  # would go first, but no seat
    clock.now = 1.0
    out, _ = step(sched)
    assert out.expired_requests == [] and plan(out) == [("busy", 1)]
    clock.now = 2.0
    out, _ = step(sched)
    (expired,) = out.expired_requests
    assert expired.request_id == "sla" and expired.status == RequestStatus.FINISHED_DEADLINE
    assert expired.finish_reason == "abort" and expired.stop_reason == "deadline"
    assert plan(out) == [("busy", 1)] and sched.make_stats().num_waiting == 0
    assert "sla" in sched.schedule().finished_req_ids


def test_running_request_is_not_cut_by_its_deadline():
    clock = FakeClock()
    sched = make_scheduler(clock=clock)
    req = make_request("a", max_tokens=3, deadline=1.0)
    sched.add_request(req)
    step(sched)
    clock.now = 5.0
    step(sched)
    step(sched)
    assert req.status == RequestStatus.FINISHED_LENGTH and req.num_output_tokens == 3


# -- preemption ------------------------------------------------------------------------------------


def test_preempts_the_latest_arrival_and_resumes_it_by_recompute():
    sched = make_scheduler(num_blocks=5, enable_prefix_caching=False)  # 4 usable blocks
    a = make_request("a", num_prompt=4, max_tokens=8, arrival=0.0)
    b = make_request("b", num_prompt=4, max_tokens=8, arrival=1.0)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # a: [1], b: [2]
    step(sched)  # both grow into a second block: a: [1, 3], b: [2, 4]
    for _ in range(3):
        step(sched)
    assert a.num_computed_tokens == 8 and b.num_computed_tokens == 8  # positions 0..7: blocks full
    out, _ = step(sched)  # both need a third block, none free: b (latest arrival) goes
    assert out.preempted_req_ids == ["b"] and plan(out) == [("a", 1)]
    assert out.scheduled[0].block_ids == [1, 3, 2]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and sched.num_preemptions_total == 1
    assert sched.kv_cache_manager.get_block_ids(b) == [] and sched.waiting == [b]
    b_tokens = list(b.all_token_ids)
    while not a.is_finished:
        out, _ = step(sched)
        assert "b" not in [s.request_id for s in out.scheduled]
    out = sched.schedule()
    (s,) = out.scheduled
    assert s.request_id == "b" and s.token_ids == b_tokens  # prompt + outputs recomputed
    assert (s.num_computed_tokens, s.num_new_tokens, s.needs_sample) == (0, 9, True)
    assert b.status == RequestStatus.RUNNING and b.num_cached_tokens == 0


def test_preempted_request_revives_its_own_cached_prefix():
    sched = make_scheduler(num_blocks=5)  # 4 usable blocks
    a = make_request("a", num_prompt=4, max_tokens=8, arrival=0.0)
    b = make_request("b", num_prompt=4, max_tokens=8, arrival=1.0)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(5):
        step(sched)  # a: [1, 3], b: [2, 4], all full and cached
    out, _ = step(sched)
    # b frees 4 then 2 to the tail; a takes 4 (evicting its hash), 2 stays cached and free.
    assert out.preempted_req_ids == ["b"] and out.scheduled[0].block_ids == [1, 3, 4]
    while not a.is_finished:
        step(sched)
    (s,) = sched.schedule().scheduled
    assert s.request_id == "b" and (s.num_computed_tokens, s.num_new_tokens) == (4, 5)
    assert s.block_ids == [2, 4, 3]
    assert b.num_cached_tokens == 0  # reported prefix hits are those of the first admission


def test_preempts_the_lowest_priority_even_if_it_arrived_first():
    sched = make_scheduler(num_blocks=5, enable_prefix_caching=False)
    low = make_request("low", num_prompt=4, priority=5, arrival=0.0)
    high = make_request("high", num_prompt=4, priority=0, arrival=1.0)
    sched.add_request(low)
    sched.add_request(high)
    preempted = []
    for _ in range(6):
        out, _ = step(sched)
        preempted += out.preempted_req_ids
    assert preempted == ["low"] and high.status == RequestStatus.RUNNING


def test_no_admission_in_a_step_that_preempted():
    sched = make_scheduler(num_blocks=5, enable_prefix_caching=False)
    sched.add_request(make_request("a", num_prompt=4, arrival=0.0))
    sched.add_request(make_request("b", num_prompt=4, arrival=1.0))
    for _ in range(5):
        step(sched)
    sched.add_request(make_request("c", num_prompt=1, priority=-1, arrival=2.0))  # head; would fit
    out, _ = step(sched)
    assert out.preempted_req_ids == ["b"] and plan(out) == [("a", 1)]
    assert sched.kv_cache_manager.pool.get_num_free_blocks() == 1
    assert plan(sched.schedule()) == [("a", 1), ("c", 1)]


def test_request_that_preempts_itself_is_not_scheduled():
    sched = make_scheduler(num_blocks=3, max_num_batched_tokens=64, enable_prefix_caching=False)
    a = make_request("a", num_prompt=4, max_tokens=4, arrival=0.0)
    b = make_request("b", num_prompt=3, max_tokens=2, arrival=1.0)
    sched.add_request(a)
    sched.add_request(b)
    assert plan(step(sched)[0]) == [("a", 4), ("b", 3)]  # a: [1], b: [2]
    out, _ = step(sched)  # a needs block 2 for position 4; b (a's victim) is preempted
    assert out.preempted_req_ids == ["b"] and plan(out) == [("a", 1)]


# -- abort, finish, rejection ------------------------------------------------------------------------


def test_abort_frees_blocks_at_once():
    sched = make_scheduler()
    a, b = make_request("a", num_prompt=10), make_request("b", arrival=1.0)
    sched.add_request(a)
    step(sched)
    sched.add_request(b)
    assert sched.make_stats().num_used_blocks == 3
    assert sched.abort_requests(["a", "b", "nope"]) == [a, b]
    assert a.status == RequestStatus.FINISHED_ABORTED and a.finish_reason == "abort"
    assert sched.make_stats().num_used_blocks == 0 and sched.kv_cache_manager.pool.get_num_free_blocks() == 20
    assert sched.running == [] and sched.waiting == [] and not sched.has_unfinished_requests()
    out = sched.schedule()
    assert out.is_empty and out.finished_req_ids == {"a", "b"}


def test_abort_between_schedule_and_update_is_skipped():
    sched = make_scheduler()
    req = make_request("a")
    sched.add_request(req)
    out = sched.schedule()
    sched.abort_requests("a")
    assert sched.update_from_output(out, {"a": [7]}) == [] and req.output_token_ids == []


def test_finish_requests_for_a_stop_string():
    sched = make_scheduler()
    req = make_request("a")
    sched.add_request(req)
    step(sched)
    assert sched.finish_requests("a", RequestStatus.FINISHED_STOPPED) == [req]
    assert req.finish_reason == "stop" and sched.make_stats().num_used_blocks == 0
    with pytest.raises(ValueError, match="finished status"):
        sched.finish_requests("a", RequestStatus.RUNNING)


@pytest.mark.parametrize(
    ("num_prompt", "max_tokens", "message"),
    [
        (60, 8, "context length is 64 tokens, but the request needs 68 (60 in the prompt, 8 for max_tokens)"),
        (0, 8, "prompt must contain at least one token"),
        (64, None, "prompt has 64 tokens, which leaves no room for output"),
    ],
)
def test_never_fitting_requests_are_rejected_at_add_time(num_prompt, max_tokens, message):
    sched = make_scheduler()
    with pytest.raises(ValueError) as info:
        sched.add_request(make_request("x", num_prompt=num_prompt, max_tokens=max_tokens))
    assert message in str(info.value)
    assert not sched.has_unfinished_requests()


def test_request_larger_than_the_whole_pool_is_rejected():
    sched = make_scheduler(num_blocks=5)  # 4 blocks = 16 slots
    sched.add_request(make_request("fits", num_prompt=10, max_tokens=7))  # 16 slots
    with pytest.raises(ValueError, match="needs 5 KV cache blocks .* whole KV cache has 4"):
        sched.add_request(make_request("big", num_prompt=10, max_tokens=8))


def test_duplicate_request_id_is_rejected():
    sched = make_scheduler()
    sched.add_request(make_request("a"))
    with pytest.raises(ValueError, match="request_id 'a' is already in use"):
        sched.add_request(make_request("a"))


def test_max_tokens_none_runs_to_the_context_or_pool_limit():
    sched = make_scheduler(max_model_len=16)
    req = make_request("a", num_prompt=10, max_tokens=None)
    sched.add_request(req)
    assert req.max_tokens == 6
    small = make_scheduler(num_blocks=4, max_model_len=64)  # 3 blocks: 12 slots, 13 tokens
    req = make_request("b", num_prompt=10, max_tokens=None)
    small.add_request(req)
    assert req.max_tokens == 3


# -- stop conditions -------------------------------------------------------------------------------


def test_eos_stops_and_is_kept_in_the_output():
    sched = make_scheduler()
    req = make_request("a")
    sched.add_request(req)
    step(sched, token=5)
    _, finished = step(sched, token=EOS)
    assert finished == [req] and req.output_token_ids == [5, EOS]
    assert req.status == RequestStatus.FINISHED_STOPPED and req.stop_reason is None


def test_ignore_eos_and_min_tokens():
    sched = make_scheduler()
    ignore = make_request("ignore", max_tokens=3, ignore_eos=True)
    least = make_request("least", min_tokens=2)
    sched.add_request(ignore)
    sched.add_request(least)
    step(sched, token=EOS)
    assert not least.is_finished
    step(sched, token=EOS)
    assert least.status == RequestStatus.FINISHED_STOPPED and least.output_token_ids == [EOS, EOS]
    step(sched, token=EOS)
    assert ignore.status == RequestStatus.FINISHED_LENGTH and ignore.output_token_ids == [EOS] * 3


def test_stop_token_ids_set_stop_reason():
    sched = make_scheduler()
    req = make_request("a", stop_token_ids=[42], ignore_eos=True)
    sched.add_request(req)
    step(sched, token=5)
    step(sched, token=42)
    assert req.finish_reason == "stop" and req.stop_reason == 42


# -- prefix caching through the scheduler ------------------------------------------------------------


def test_prefix_hit_skips_cached_tokens_and_counts_them():
    sched = make_scheduler()
    sched.add_request(make_request("a", num_prompt=10, first_token=100))
    out = sched.schedule()
    assert sched.kv_cache_manager.pool.cached_blocks == {}  # cached only once computed
    sched.update_from_output(out, {"a": [7]})
    b = make_request("b", num_prompt=10, first_token=100, arrival=1.0)
    sched.add_request(b)
    out = sched.schedule()
    s = out.scheduled[1]
    assert (s.request_id, s.num_computed_tokens, s.num_new_tokens) == ("b", 8, 2)
    assert s.token_ids == [108, 109] and s.block_ids == [1, 2, 4] and s.is_prefill
    assert b.num_cached_tokens == 8
    stats = sched.make_stats()
    assert (stats.prefix_cache_queries_total, stats.prefix_cache_hits_total) == (20, 8)


def _cache_prompt(sched: Scheduler, first_token: int = 100, num_prompt: int = 10) -> None:
    """Run one request of `num_prompt` tokens to completion so that its full blocks are cached."""
    sched.add_request(make_request("seed", num_prompt=num_prompt, first_token=first_token, max_tokens=1))
    step(sched)
    step(sched)  # (the finished request's placeholder step)
    assert not sched.running and sched.kv_cache_manager.pool.cached_blocks


def test_prefix_hit_is_admitted_ahead_of_a_unique_prefill():
    sched = make_scheduler(max_num_batched_tokens=12)
    _cache_prompt(sched)
    sched.add_request(make_request("unique", num_prompt=12, arrival=1.0))
    sched.add_request(make_request("hit", num_prompt=10, first_token=100, arrival=2.0))
    # The hit's 2 uncached tokens go first and it samples now; the unique prompt takes the rest.
    assert plan(sched.schedule()) == [("hit", 2), ("unique", 10)]


def test_hits_do_not_jump_a_higher_priority_or_take_a_mostly_uncached_prompt_ahead():
    sched = make_scheduler(max_num_batched_tokens=12)
    _cache_prompt(sched)
    sched.add_request(make_request("urgent", num_prompt=12, priority=0, arrival=1.0))
    sched.add_request(make_request("hit", num_prompt=10, first_token=100, priority=1, arrival=2.0))
    assert plan(sched.schedule()) == [("urgent", 12)]
    sched = make_scheduler(max_num_batched_tokens=12)
    _cache_prompt(sched)
    sched.add_request(make_request("unique", num_prompt=12, arrival=1.0))
    longer = list(range(100, 108)) + list(range(5000, 5012))  # 8 cached tokens, 12 uncached
    sched.add_request(Request("partial", longer, SamplingParams(max_tokens=8), arrival_time=2.0))
    assert plan(sched.schedule()) == [("unique", 12)]


def test_no_prefix_hits_when_disabled():
    sched = make_scheduler(enable_prefix_caching=False)
    sched.add_request(make_request("a", num_prompt=10, first_token=100))
    step(sched)
    sched.add_request(make_request("b", num_prompt=10, first_token=100, arrival=1.0))
    assert plan(sched.schedule())[1] == ("b", 10)
    assert sched.make_stats().prefix_cache_queries_total == 0


# -- speculative tokens ----------------------------------------------------------------------------


def test_spec_tokens_are_scheduled_and_rejected_slots_rewound():
    sched = make_scheduler()
    req = make_request("a", num_prompt=6, max_tokens=10)
    sched.add_request(req)
    step(sched, token=7)
    sched.update_draft_token_ids({"a": [8, 9, 10]})
    out = sched.schedule()
    (s,) = out.scheduled
    assert (s.num_computed_tokens, s.num_new_tokens) == (6, 4)
    assert s.token_ids == [7, 8, 9, 10] and s.spec_token_ids == [8, 9, 10] and s.needs_sample
    assert s.block_ids == [1, 2, 3]
    sched.update_from_output(out, {"a": [8, 11]})  # draft 8 accepted, 9 rejected, bonus 11
    assert req.output_token_ids == [7, 8, 11]
    assert req.num_computed_tokens == 8 and req.spec_token_ids == []
    stats = sched.make_stats()
    assert (stats.spec_decode_num_drafts_total, stats.spec_decode_num_draft_tokens_total) == (1, 3)
    assert stats.spec_decode_num_accepted_tokens_total == 1
    (s,) = sched.schedule().scheduled
    assert (s.num_computed_tokens, s.token_ids) == (8, [11])


def test_spec_tokens_are_trimmed_to_max_tokens_and_stop_inside_drafts():
    sched = make_scheduler()
    req = make_request("a", num_prompt=6, max_tokens=3)
    sched.add_request(req)
    step(sched, token=7)
    sched.update_draft_token_ids({"a": [8, 9, 10, 11]})
    out = sched.schedule()
    assert out.scheduled[0].spec_token_ids == [8]  # 6 prompt + 3 max_tokens - 1 = 8 positions max
    assert sched.update_from_output(out, {"a": [8, 12]}) == [req] and req.output_token_ids == [7, 8, 12]
    sched2 = make_scheduler()
    req2 = make_request("b", num_prompt=6, max_tokens=10)
    sched2.add_request(req2)
    step(sched2, token=7)
    sched2.update_draft_token_ids({"b": [8, EOS, 9]})
    out = sched2.schedule()
    assert sched2.update_from_output(out, {"b": [8, EOS, 9, 13]}) == [req2]
    assert req2.output_token_ids == [7, 8, EOS] and req2.finish_reason == "stop"


def test_more_tokens_than_drafts_is_an_error():
    sched = make_scheduler()
    sched.add_request(make_request("a"))
    step(sched)
    sched.update_draft_token_ids({"a": [1]})
    out = sched.schedule()
    with pytest.raises(ValueError, match="3 tokens for 1 drafts"):
        sched.update_from_output(out, {"a": [1, 2, 3]})
