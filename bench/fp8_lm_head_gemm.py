"""A draft's LM head at decode sizes: the bf16 product against the FP8 head (layers/fp8_lm_head.py).

    PYTHONPATH=common/src:worker/src python bench/fp8_lm_head_gemm.py                       # GPU: 1B shape
    PYTHONPATH=common/src:worker/src python bench/fp8_lm_head_gemm.py --hidden 64 --vocab 1024 --rows 1 5   # CPU smoke

For each row count M: [M, hidden] x [hidden, vocab] as `F.linear` on the bf16 weight (the baseline)
and through `Fp8LMHead` (on a GPU with an FP8 GEMM: activations cast to e4m3, rows padded to 16,
torch._scaled_mm), each timed as 20 calls in one CUDA graph (on a CPU: a plain loop), and how often
the two agree on each row's argmax (random hidden states: near-ties flip more than a model's).
Prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from infergrid.worker.layers.fp8_lm_head import Fp8LMHead


def time_us(fn: Callable[[], object], calls: int = 20, rounds: int = 10) -> float:
    """Mean microseconds per call (CUDA: `calls` calls captured in one graph, replayed `rounds` times)."""
    for _ in range(3):
        fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(calls * rounds):
            fn()
        return (time.perf_counter() - start) * 1e6 / (calls * rounds)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(rounds):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) * 1e3 / (calls * rounds)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 5, 16, 32])
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(args.vocab, args.hidden, device=device, dtype=dtype, generator=g) * 0.02
    head = Fp8LMHead(weight)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"LM head [M, {args.hidden}] x [{args.hidden}, {args.vocab}], {dtype} on {name}; "
          f"FP8 GEMM: {head.use_fp8_gemm} (else the dequantized weights)")
    print(f"| M | {dtype} F.linear us | TB/s | FP8 head us | TB/s | speedup | argmax agreement |")
    print("|---|---|---|---|---|---|---|")
    for m in args.rows:
        x = torch.randn(m, args.hidden, device=device, dtype=dtype, generator=g)
        base = time_us(lambda x=x: F.linear(x, weight))
        fp8 = time_us(lambda x=x: head(x))
        agree = (F.linear(x, weight).argmax(-1) == head(x).argmax(-1)).float().mean().item()
        base_bytes = weight.numel() * weight.element_size()
        fp8_bytes = weight.numel() if head.use_fp8_gemm else base_bytes
        print(f"| {m} | {base:.1f} | {base_bytes / base / 1e6:.2f} | {fp8:.1f} | {fp8_bytes / fp8 / 1e6:.2f} | "
              f"{base / fp8:.2f}x | {agree:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
