"""Triton kernels that replace a handful of torch ops on the host's critical path, run by Triton's
interpreter on the CPU against those torch ops: the staging of a step's inputs into a CUDA graph's
buffers (engine/graph_inputs.py) and the cut of each request's rows after its first rejected draft
(spec_decode/rejection_sampler.keep_accepted_prefix), the inputs of a draft proposal made ahead
(spec_decode/ahead_graph.AheadGraphRunner)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import torch
from infergrid.worker.engine.graph_inputs import GraphInputs, _stage_torch, _stage_triton

def buffers(n, q, cols, with_qsl, seed):
    g = torch.Generator().manual_seed(seed)  # stale values from earlier steps: must survive where not written
    rnd = lambda *shape, dtype=torch.int64: torch.randint(0, 1000, shape, generator=g).to(dtype)
    return GraphInputs(rnd(n * q), rnd(n * q), rnd(n * q), rnd(n, dtype=torch.int32), rnd(n, cols, dtype=torch.int32),
                       rnd(n + 1, dtype=torch.int32) if with_qsl else None)

cases = 0
for decode in (True, False):
    for n, bs, q_lens, width, src_dtype in [(1, 1, [1], 3, torch.int64), (3, 4, [1, 2, 1], 5, torch.int64),
                                            (5, 8, [3, 1, 2, 3, 1], 7, torch.int32), (17, 32, [2] * 17, 40, torch.int64)]:
        if decode:
            q_lens = [1] * n
        t = sum(q_lens)
        g = torch.Generator().manual_seed(n)
        src = dict(
            input_ids=torch.randint(0, 5000, (t,), generator=g), positions=torch.randint(0, 900, (t,), generator=g),
            slot_mapping=torch.randint(0, 9000, (t,), generator=g),
            seq_lens=torch.randint(1, 900, (n,), generator=g).to(src_dtype),
            block_tables=torch.randint(0, 500, (n, width), generator=g).to(src_dtype),
            query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()]).to(src_dtype),
        )
        token_end = bs if decode else t + 3
        args = dict(token_end=token_end, batch_size=bs, seq_pad=1 if decode else 0, null_slot=16,
                    pad_table_rows=decode)
        a, b = buffers(32, 4, 64, not decode, 7), buffers(32, 4, 64, not decode, 7)
        qsl = None if decode else src["query_start_loc"]
        srcs = [src[k] for k in ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables")]
        _stage_torch(a, *srcs, qsl, *args.values())
        _stage_triton(b, *srcs, qsl, *args.values())
        for name in ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables", "query_start_loc"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            assert x is None or torch.equal(x, y), (decode, n, name, x, y)
        assert torch.equal(b.slot_mapping[t:token_end], torch.full((token_end - t,), 16))  # the padding is written
        cases += 1
print("cases", cases)
"""


CUT_SCRIPT = r"""
import random
import torch
from infergrid.worker.spec_decode import rejection_sampler as rs

rng = random.Random(0)
cases = cut = kept = 0
for trial in range(40):
    q_lens = [rng.randint(1, 5) for _ in range(rng.randint(1, 300))]  # > one program's rows at times
    starts = [s for i, q in enumerate(q_lens) for s in [sum(q_lens[:i])] * q]
    n = len(starts)
    sampled = torch.randint(0, 4, (n,))
    drafts = torch.where(torch.rand(n) < 0.8, sampled, torch.randint(0, 4, (n,)))
    for i, q in enumerate(q_lens):  # each request's last row is its bonus row
        drafts[sum(q_lens[: i + 1]) - 1] = rs.NO_DRAFT
    device_drafts = torch.randint(0, 4, (n, 2))
    sources = torch.where(torch.rand(n) < 0.3, torch.randint(0, 2 * n, (n,)), -1)
    sources[drafts == rs.NO_DRAFT] = -1
    starts_t = torch.tensor(starts)
    for with_device in (False, True):
        extra = (sources, device_drafts) if with_device else ()
        args = (sampled, drafts, starts_t, max(q_lens), *(extra or (None, None)))
        expected = rs._keep_accepted_prefix_torch(*args)
        out = rs._keep_accepted_prefix_triton(*args)
        assert torch.equal(out, expected), (trial, with_device, out, expected)
        cut += int((expected == -1).sum())
        kept += int((expected >= 0).sum())
        cases += 1
assert cut > 100 and kept > 100, (cut, kept)  # both outcomes are exercised
print("cases", cases)
"""


AHEAD_SCRIPT = r"""
import types
import torch
from infergrid.worker.spec_decode.ahead_graph import AheadGraphRunner

def runner(k, seed):  # the static buffers of a graph set for up to 16 requests, with stale contents
    g = torch.Generator().manual_seed(seed)
    r = object.__new__(AheadGraphRunner)
    r.num_drafts, r.query_len, r.runner = k, k + 2, types.SimpleNamespace(block_size=4)
    r.last_token, r.c0 = torch.randint(0, 99, (16,), generator=g), torch.randint(0, 99, (16,), generator=g)
    r.sampled = torch.randint(0, 99, (16, k + 1), generator=g)
    r.block_tables = torch.randint(0, 99, (16, 12), generator=g).to(torch.int32)
    return r

cases = 0
for n, bs, width, k in [(1, 1, 2, 4), (3, 4, 5, 4), (5, 8, 1, 2), (16, 16, 12, 3)]:
    g = torch.Generator().manual_seed(n)
    num_sampled = n * (k + 1) - 2
    src = torch.randint(0, num_sampled + 1, (n * (k + 1),), generator=g)  # num_sampled: the -1 padding row
    flat = torch.cat([torch.randint(0, 999, (2 * n,), generator=g), src,
                      torch.randint(0, 999, (n * width,), generator=g)])
    sampled = torch.randint(0, 999, (num_sampled,), generator=g)
    a, b = runner(k, 7), runner(k, 7)
    a._stage_torch(flat, sampled, n, width, bs)
    b._stage_triton(flat, sampled, n, width, bs)
    for name in ("last_token", "c0", "sampled", "block_tables"):
        assert torch.equal(getattr(a, name), getattr(b, name)), (n, name, getattr(a, name), getattr(b, name))
    assert (b.sampled[:n].view(-1)[src == num_sampled] == -1).all() and (b.sampled[n:bs] == -1).all()
    cases += 1
print("cases", cases)
"""


def _run(script: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO / "worker/src"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_stage_kernel_matches_the_torch_ops():
    assert "cases 8" in _run(SCRIPT)


def test_keep_accepted_prefix_kernel_matches_the_torch_ops():
    assert "cases 80" in _run(CUT_SCRIPT)


def test_ahead_staging_kernel_matches_the_torch_ops():
    assert "cases 4" in _run(AHEAD_SCRIPT)
