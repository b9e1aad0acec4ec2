"""Tensor parallelism through the CUDA-graph code paths, on CPU (gloo).

On GPU, two ranks that issue different collectives hang NCCL without a word. Here the same code
paths run on CPU: INFERGRID_EMULATE_CUDA_GRAPHS captures and replays the decode and verification
graphs with eager stand-ins (the graph plan, the warm-up/capture sequence, the padded batch size
rank 0 puts in each step header, the release before leaving the group), and INFERGRID_TP_DEBUG
checks after INIT_KV_CACHE and after every step that all ranks issued the same collectives. Also:
the guard reports a divergence on every rank, and the step header round-trips."""

from __future__ import annotations

import gc
import multiprocessing
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist

from infergrid.worker import LLM, SamplingParams
from infergrid.worker.distributed import debug, messages
from infergrid.worker.distributed.messages import Command, GraphKind, GraphPlan, StepHeader
from infergrid.worker.runner.cuda_graph import num_live_graphs, unpack_key

PROMPTS = ["Hello, how are you", "The quick brown fox jumps over the lazy dog. A small model",
           "What is the capital of France? Paris is", "Once upon a time", "1 2 3 4 5 6 7 8 9"]
ENGINE_ARGS = dict(dtype="float32", device="cpu", max_model_len=256, max_num_seqs=8, block_size=8,
                   max_num_batched_tokens=32, num_gpu_blocks_override=160)
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)


def test_step_header_and_graph_plan_round_trip():
    header = StepHeader(num_tokens=7, num_seqs=3, num_block_columns=2, num_logits=5, max_query_len=4,
                        max_seq_len=40, step_id=12, graph_kind=GraphKind.MULTI_TOKEN, graph_key=4)
    plan = GraphPlan(decode_max_batch_size=8, multi_token_max_batch_size=8, multi_token_max_query_len=4)
    inputs = np.arange(header.flat_size, dtype=np.int64) - 3
    step = messages.pack(Command.EXECUTE, header, inputs)
    assert messages.unpack(step) == (Command.EXECUTE, header)
    assert messages.step_inputs(step).tolist() == inputs.tolist()
    with pytest.raises(ValueError, match="inputs"):
        messages.unpack(step[:-8])  # one input short
    with pytest.raises(ValueError, match="inputs"):
        messages.pack(Command.EXECUTE, header, inputs[:-1])
    assert messages.unpack(messages.pack(Command.INIT_KV_CACHE, plan)) == (Command.INIT_KV_CACHE, plan)
    assert messages.unpack(messages.pack(Command.SHUTDOWN)) == (Command.SHUTDOWN, None)
    assert len(messages.pack(Command.SHUTDOWN)) == messages.MESSAGE_SIZE
    with pytest.raises(ValueError, match="bytes"):
        messages.unpack(b"\0" * 8)
    bad_kind = bytearray(step)
    bad_kind[8 * 8: 8 * 9] = (7).to_bytes(8, "little")  # graph_kind field
    with pytest.raises(ValueError):
        messages.unpack(bytes(bad_kind))


def test_tp2_through_the_graph_paths_matches_tp1_and_every_step_agrees(tiny_llama, monkeypatch):
    monkeypatch.delenv("INFERGRID_EMULATE_CUDA_GRAPHS", raising=False)
    monkeypatch.delenv("INFERGRID_TP_DEBUG", raising=False)
    reference = LLM(tiny_llama, **ENGINE_ARGS)
    expected = [o.outputs[0] for o in reference.generate(PROMPTS, GREEDY)]
    assert reference.llm_engine.model_runner.decode_graphs is None  # the plain CPU path

    monkeypatch.setenv("INFERGRID_EMULATE_CUDA_GRAPHS", "1")  # the spawned rank inherits both
    monkeypatch.setenv("INFERGRID_TP_DEBUG", "1")
    llm = LLM(tiny_llama, tensor_parallel_size=2, speculative_method="ngram", num_speculative_tokens=3,
              **ENGINE_ARGS)
    engine = llm.llm_engine
    runner = engine.model_runner
    try:
        got = [o.outputs[0] for o in llm.generate(PROMPTS, GREEDY)]
        decode, verify = runner.decode_graphs, runner.multi_token_graphs
        assert decode is not None and verify is not None
        assert sorted(decode.graphs) == sorted(decode.keys) and [unpack_key(k) for k in sorted(decode.graphs)] == [
            (1, 1), (2, 2), (4, 4), (8, 8)]  # decode: the query-length-1 case, one capacity per batch size
        assert sorted(verify.graphs) == sorted(verify.keys) and {unpack_key(k)[0] for k in verify.graphs} == {1, 2, 4, 8}
        assert decode.num_replays > 0 and verify.num_replays > 0  # both graph kinds, as rank 0 named them
        # INIT_KV_CACHE, and every step before and after its forward pass, were checked on both ranks
        # (a divergence raises on all of them).
        assert runner.num_steps > decode.num_replays + verify.num_replays
        assert debug.num_checks() == 1 + 2 * runner.num_steps
    finally:
        engine.shutdown()
    for e, g in zip(expected, got, strict=True):
        assert g.token_ids == e.token_ids
        for e_lp, g_lp in zip(e.logprobs, g.logprobs, strict=True):
            tok = next(iter(e_lp))
            assert g_lp[tok].logprob == pytest.approx(e_lp[tok].logprob, abs=1e-4)
    # Graphs released before the group was left, on rank 0 and on rank 1 (which then exited cleanly).
    assert runner.decode_graphs is None and runner.multi_token_graphs is None
    assert decode.graphs == {} and verify.graphs == {}
    assert [r.process.exitcode for r in engine.model_executor._ranks] == [0]
    del reference
    gc.collect()  # engines of earlier tests in this process that only reference cycles still hold
    assert num_live_graphs() == 0


def _guard_rank(rank: int, port: int, results: multiprocessing.Queue) -> None:
    from infergrid.worker.distributed.communication import tensor_parallel_all_reduce, tensor_parallel_barrier
    from infergrid.worker.distributed.parallel_state import destroy_tensor_parallel, init_tensor_parallel

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, False)
    init_tensor_parallel(rank, 2, "gloo", store, debug_collectives=True)
    tensor_parallel_barrier(torch.device("cpu"))
    try:
        x = torch.full((4,), float(rank + 1))
        tensor_parallel_all_reduce(x)  # the same on both ranks
        debug.check(1, "at the end")
        if rank == 1:  # e.g. a CUDA graph of another batch size: its all-reduces have another shape
            debug.record("all_reduce", torch.zeros(3, 16))
        tensor_parallel_all_reduce(x)
        debug.check(2, "at the end")
        results.put((rank, "no mismatch", x.tolist(), debug.num_checks()))
    except debug.CollectiveMismatchError as exc:
        results.put((rank, str(exc), x.tolist(), debug.num_checks()))
    except BaseException:  # noqa: BLE001 - reported to the test
        results.put((rank, traceback.format_exc(), [], -1))
    finally:
        destroy_tensor_parallel()


def test_the_guard_reports_a_divergence_on_every_rank():
    store = dist.TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_guard_rank, args=(rank, store.port, results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        reports = dict((r[0], r[1:]) for r in (results.get(timeout=60) for _ in procs))
    finally:
        for p in procs:
            p.join(10)
            p.kill()
    for rank in (0, 1):
        message, x, num_checks = reports[rank]
        assert x == [6.0] * 4 and num_checks == 1, message  # the real collectives agreed; step 1 passed
        assert message.startswith("tensor-parallel ranks diverged by step 2 at the end:"), message
        assert "rank 0: step 2 at the end, 3 collectives" in message  # init barrier + 2 all-reduces
        assert "rank 1: step 2 at the end, 4 collectives" in message
        assert "#3 all_reduce[3, 16]:float32" in message  # rank 1's extra collective, named
