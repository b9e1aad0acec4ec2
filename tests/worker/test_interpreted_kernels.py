"""Triton kernels that replace a handful of torch ops on the host's critical path, run by Triton's
interpreter on the CPU against those torch ops: the staging of a step's inputs into a CUDA graph's
buffers (runner/graph_inputs.py) and the cut of each request's rows after its first rejected draft
(sample/rejection_sampler.keep_accepted_prefix), the inputs of a draft proposal made ahead
(spec_decode/ahead_graph.AheadGraphRunner), the metadata of a draft graph's passes and the two-stage
argmax (sample/argmax.py); and the paged-attention kernel's context splits against plain attention."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import torch
from infergrid.worker.runner.graph_inputs import GraphInputs, _stage_torch, _stage_triton

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
from infergrid.worker.sample import rejection_sampler as rs

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


ARGMAX_SCRIPT = r"""
import torch
from infergrid.worker.sample.argmax import _argmax_rows_torch, _argmax_rows_triton

g = torch.Generator().manual_seed(0)
cases = 0
for rows, vocab, dtype in [(1, 100, torch.float32), (3, 2048, torch.bfloat16), (5, 5000, torch.float32),
                           (2, 128256, torch.bfloat16), (7, 4097, torch.float16)]:
    x = torch.randint(-3, 4, (rows, vocab), generator=g).to(dtype)  # many ties: the first maximum wins
    x[0, vocab // 2] = 9  # a unique maximum in a later chunk
    if rows > 2:
        x[1] = float("-inf")  # a row of -inf: index 0, as torch
        x[2, -1] = 10  # the maximum at the very end
    out = torch.full((rows, 3), -5, dtype=torch.int64)
    got = _argmax_rows_triton(x, out[:, 1])  # a strided output (a column of a drafts buffer)
    expected = x.float().argmax(dim=-1)
    assert got.data_ptr() == out[:, 1].data_ptr() and torch.equal(out[:, 1], expected), (rows, vocab, got, expected)
    assert (out[:, 0] == -5).all() and (out[:, 2] == -5).all()
    assert torch.equal(_argmax_rows_triton(x, None), expected) and torch.equal(_argmax_rows_torch(x), expected)
    cases += 1
print("cases", cases)
"""


PASS_METADATA_SCRIPT = r"""
import types
import torch
from infergrid.worker.spec_decode.ahead_graph import AheadGraphRunner

def runner(k, seed):  # an ahead graph set's buffers for up to 8 requests, with stale contents
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, dtype=torch.int64: torch.randint(0, 60, shape, generator=g).to(dtype)
    r = object.__new__(AheadGraphRunner)
    n, q = 8, k + 2
    r.num_drafts, r.query_len, r.runner = k, q, types.SimpleNamespace(block_size=4)
    r.last_token, r.c0, r.start = rnd(n), rnd(n), rnd(n)
    r.sampled = torch.where(torch.rand(n, k + 1, generator=g) < 0.3, -1, rnd(n, k + 1))
    r.sampled[0, 1:] = -1  # one accepted token (the target rejected the first draft)
    r.sampled[1] = -1  # a dummy row
    r.block_tables = rnd(n, 40, dtype=torch.int32)
    r.positions, r.slot_mapping, r.seq_lens = rnd(k - 1, n), rnd(k - 1, n), rnd(k - 1, n, dtype=torch.int32)
    r.first_input_ids, r.first_positions, r.first_slot_mapping = rnd(n * q), rnd(n * q), rnd(n * q)
    r.first_seq_lens, r.emitted_rows = rnd(n, dtype=torch.int32), rnd(n)
    r.offsets, r.rows = torch.arange(q), torch.arange(n) * q
    return r

names = ("first_input_ids", "first_positions", "first_slot_mapping", "first_seq_lens", "emitted_rows", "start",
         "positions", "slot_mapping", "seq_lens")
cases = 0
for k, bs in [(2, 1), (4, 3), (4, 8), (5, 6)]:
    a, b = runner(k, k * bs), runner(k, k * bs)
    a._first_pass_metadata_torch(bs)
    b._first_pass_metadata_triton(bs)
    for j in range(k - 1):
        a._pass_metadata_torch(bs, j)
        b._pass_metadata_triton(bs, j)
    for name in names:
        assert torch.equal(getattr(a, name), getattr(b, name)), (k, bs, name, getattr(a, name), getattr(b, name))
    cases += 1
print("cases", cases)
"""


ATTENTION_SCRIPT = r"""
import numpy as np
import torch
from triton.runtime import interpreter

# Triton 3.6's interpreter loads a scalar as a 1-element array, which a loop bound cannot take
# (`range(0, n, B)` with a loaded n): read its element.
patch_tensor = interpreter._patch_lang_tensor
def patched(tensor, scope):
    patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
interpreter._patch_lang_tensor = patched

from infergrid.worker.layers import triton_attention as ta

ta._num_sms = lambda device: 132  # (an H100's, for the split count; the interpreter has no GPU)
combines = []  # launches of the kernel that merges a context's splits

class Spy:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        combines.append(grid)
        return self.kernel[grid]

ta._combine_splits_kernel = Spy(ta._combine_splits_kernel)
g = torch.Generator().manual_seed(0)
heads, kv_heads, dim, page, num_blocks = 8, 2, 32, 16, 128
k_cache = torch.randn(num_blocks, page, kv_heads, dim, generator=g)
v_cache = torch.randn(num_blocks, page, kv_heads, dim, generator=g)

def reference(q, tables, seq_lens, q_lens):
    out, start = torch.empty_like(q), 0
    for i, (n, ql) in enumerate(zip(seq_lens.tolist(), q_lens)):
        pos = torch.arange(n)
        keys = k_cache[tables[i, pos // page], pos % page].repeat_interleave(heads // kv_heads, dim=1)
        vals = v_cache[tables[i, pos // page], pos % page].repeat_interleave(heads // kv_heads, dim=1)
        qi = q[start:start + ql]  # [ql, H, D] at positions n - ql ..
        s = torch.einsum("qhd,khd->hqk", qi, keys) / dim ** 0.5
        s = s.masked_fill(pos[None, None, :] > (n - ql + torch.arange(ql))[None, :, None], float("-inf"))
        out[start:start + ql] = torch.einsum("hqk,khd->qhd", s.softmax(-1), vals)
        start += ql
    return out

cases = splits = 0
for q_lens, seq_lens in [([1], [300]), ([5], [257]), ([5, 3, 1], [130, 64, 5]), ([8, 2], [200, 9]),
                         ([4] * 6, [100, 120, 17, 64, 65, 250]), ([20, 1], [300, 40])]:
    n = len(q_lens)
    tables = torch.randperm(num_blocks, generator=g)[: n * 20].view(n, 20).to(torch.int32)
    q = torch.randn(sum(q_lens), heads, dim, generator=g)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    got = ta.paged_attention(q, k_cache, v_cache, tables, sl, qsl, max(q_lens), dim ** -0.5)
    expected = reference(q, tables, sl, q_lens)
    assert torch.isfinite(got).all() and torch.allclose(got, expected, atol=1e-4), (q_lens, (got - expected).abs().max())
    split = bool(combines)
    assert split == (max(q_lens) <= 8), (q_lens, split)  # decode and verification-sized queries split
    splits += split and max(q_lens) > 1
    combines.clear()
    cases += 1
assert splits == 4
print("cases", cases)
"""


def _run(script: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("common/src", "worker/src")))
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


def test_argmax_kernel_matches_torch():
    assert "cases 5" in _run(ARGMAX_SCRIPT)


def test_draft_pass_metadata_kernels_match_the_torch_ops():
    assert "cases 4" in _run(PASS_METADATA_SCRIPT)


def test_paged_attention_splits_short_queries_exactly():
    """Verification-sized queries (1 + k tokens) split the context over several programs like decode
    (layers/triton_attention.py); rows that see no key of a split (a split after their position)
    must contribute nothing, not NaN."""
    assert "cases 6" in _run(ATTENTION_SCRIPT)
