"""Decode-time matrix products (few rows) of the reference shapes: achieved memory bandwidth of
`F.linear(x, W)` against its transposed form `(W @ x.T).T`, and of a one-row argmax over the
vocabulary against `argmax_rows` (two stages). What the engine should call at decode batch sizes.

    PYTHONPATH=worker/src python bench/gemv_shapes.py            # a CUDA GPU
    PYTHONPATH=worker/src python bench/gemv_shapes.py --smoke    # CPU: shapes / 16, host timing

Each product cycles through enough weight copies to overflow the L2 cache (a decode step reads every
weight once) and is timed as CUDA-graph replays with events, median of repeats. Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from infergrid.worker.sample.sampler import argmax_rows

# (name, N, K): y[M, N] = x[M, K] @ W[N, K]^T
SHAPES = [
    ("1b qkv", 3072, 2048), ("1b o", 2048, 2048), ("1b gate_up", 16384, 2048), ("1b down", 2048, 8192),
    ("1b/8b lm_head", 128256, 2048),
    ("8b qkv", 6144, 4096), ("8b o", 4096, 4096), ("8b gate_up", 28672, 4096), ("8b down", 4096, 14336),
    ("8b lm_head", 128256, 4096),
    ("8b/tp2 qkv", 3072, 4096), ("8b/tp2 o", 4096, 2048), ("8b/tp2 gate_up", 14336, 4096),
    ("8b/tp2 down", 4096, 7168), ("8b/tp2 lm_head", 64128, 4096),
]
MIN_BYTES = 400 * 2**20  # weight copies per product: past the L2 cache many times over


def time_graph(fn, copies: int, repeats: int = 20) -> float:
    """Median seconds of one call, from CUDA-graph replays of `copies` calls (on a CPU: plain calls)."""
    if not torch.cuda.is_available():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) / copies)
        return statistics.median(times)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / copies)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--smoke", action="store_true", help="CPU: every shape / 16, a few weight copies")
    args = p.parse_args()
    dev = torch.device("cpu" if args.smoke else "cuda")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}; bf16; GB/s = weight bytes / time")
    rows = []
    scale = 16 if args.smoke else 1
    for name, n, k in [(name, n // scale, k // scale) for name, n, k in SHAPES]:
        copies = 2 if args.smoke else max(2, -(-MIN_BYTES // (n * k * 2)))
        weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in args.batch:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x.float(), weights[0].float())
            a = F.linear(x, weights[0]).float()
            b = (weights[0] @ x.T).T.float()
            err = max(((a - ref).norm() / ref.norm()).item(), ((b - ref).norm() / ref.norm()).item())
            assert err < 1e-2, f"{name}: relative error {err}"
            t_lin = time_graph(lambda x=x, ws=weights: [F.linear(x, w) for w in ws], copies)
            t_tr = time_graph(lambda x=x, ws=weights: [(w @ x.T).T for w in ws], copies)
            gb = n * k * 2 / 1e9
            rows.append((name, m, t_lin * 1e6, gb / t_lin, t_tr * 1e6, gb / t_tr))
        del weights
        torch.cuda.empty_cache()
    print("| product | M | F.linear us | GB/s | (W @ x.T).T us | GB/s |")
    print("|---|---|---|---|---|---|")
    for name, m, t1, b1, t2, b2 in rows:
        print(f"| {name} | {m} | {t1:.1f} | {b1:,.0f} | {t2:.1f} | {b2:,.0f} |")
    print("| argmax over 128256 | M | torch.argmax us | argmax_rows us |")
    for m in args.batch:
        logits = [torch.randn(m, 128256, device=dev) for _ in range(4 if args.smoke else 64)]
        for t in logits:
            assert torch.equal(t.argmax(dim=-1), argmax_rows(t))
        t1 = time_graph(lambda logits=logits: [t.argmax(dim=-1) for t in logits], len(logits))
        t2 = time_graph(lambda logits=logits: [argmax_rows(t) for t in logits], len(logits))
        print(f"| argmax | {m} | {t1 * 1e6:.1f} | {t2 * 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
