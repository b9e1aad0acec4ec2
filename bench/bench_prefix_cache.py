"""Prefix-cache benchmark: TTFT with automatic prefix caching on vs off, same workload, same run.

256 requests arrive at once at the offline engine; 90% share a 2,048-token prefix (random token ids)
followed by a unique 32-token suffix, the rest are unique prompts of the same length; each generates
128 tokens (greedy, ignore_eos). The model is a random-weight checkpoint of a named shape
(bench/shapes.py; default the Llama-3.2-1B shape in bf16). Each mode gets its own engine (same
arguments except enable_prefix_caching; both alive, each with half of --gpu-memory-utilization) and a
warm-up; then --repeats times, interleaved, each mode runs the measured batch (a fresh shared prefix
per repeat, so no repeat hits another's). TTFT per request comes from the engine's own timestamps
(RequestOutput.metrics: first_token_time - arrival_time). The speedup is the median of the
same-repeat ratios off / on of TTFT p50; the table shows each mode's median repeat.

    PYTHONPATH=common/src:worker/src:operator/src:testbed/src python bench/bench_prefix_cache.py     # GPU
    .venv/bin/python bench/bench_prefix_cache.py --shape tiny --num-requests 16 --prefix-len 64 --max-tokens 8

Prints a table and writes JSON (--out). Target (issue 24): TTFT p50 >= 8x better with the cache on.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shapes import FIRST_TOKEN_ID, get_shape, make_random_checkpoint  # noqa: E402

from infergrid.worker.config import EngineConfig  # noqa: E402
from infergrid.worker.engine.llm_engine import LLMEngine  # noqa: E402
from infergrid.worker.outputs import RequestOutput  # noqa: E402
from infergrid.worker.sampling_params import SamplingParams  # noqa: E402

TARGET_TTFT_P50_SPEEDUP = 8.0


@dataclass
class ModeResult:
    """One mode's measured batch."""

    mode: str
    num_requests: int
    num_gpu_blocks: int
    ttft_p50_s: float
    ttft_p99_s: float
    ttft_mean_s: float
    e2e_p50_s: float
    wall_s: float
    output_tokens: int
    throughput_tok_s: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    hit_rate: float
    cached_tokens_reported: int
    preemptions: int
    evicted_blocks: int
    steps: int
    ttft_s: list[float]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def make_prompts(args: argparse.Namespace, vocab_size: int, seed: int) -> tuple[list[list[int]], int]:
    """The workload: shared-prefix prompts and unique ones, shuffled; returns (prompts, num_shared)."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(n)]

    num_shared = round(args.num_requests * args.shared_fraction)
    prefix = ids(args.prefix_len)
    prompts = [prefix + ids(args.suffix_len) for _ in range(num_shared)]
    prompts += [ids(args.prefix_len + args.suffix_len) for _ in range(args.num_requests - num_shared)]
    rng.shuffle(prompts)
    return prompts, num_shared


def run_batch(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, tag: str) -> tuple[
        dict[str, RequestOutput], float]:
    """Add every prompt at the same instant, step until all finish; returns (finals, wall seconds)."""
    start = time.monotonic()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params, arrival_time=start)
    finals: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals, time.monotonic() - start


def make_warmup(args: argparse.Namespace, vocab_size: int, seed: int) -> list[list[list[int]]]:
    """Two small waves with their own shared prefix, so that every kernel path the measured batch
    takes (full prefill, prefill after cached context, decode) is compiled before timing."""
    if args.num_warmup <= 0:
        return []
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(n)]

    prefix = ids(args.prefix_len)
    return [[prefix + ids(args.suffix_len) for _ in range(args.num_warmup)] for _ in range(2)]


def make_engine(args: argparse.Namespace, model: str, enable: bool) -> LLMEngine:
    config = EngineConfig(
        model=model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.prefix_len + args.suffix_len + args.max_tokens,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs or args.num_requests,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization / 2,  # both modes' engines are alive at once
        enforce_eager=args.enforce_eager,
        enable_prefix_caching=enable,
        num_gpu_blocks_override=args.num_gpu_blocks,
    )
    return LLMEngine(config)


def warm_up(engine: LLMEngine, warmup: list[list[list[int]]]) -> None:
    for i, wave in enumerate(warmup):
        run_batch(engine, wave, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), f"warmup{i}")


def measure(args: argparse.Namespace, engine: LLMEngine, enable: bool, prompts: list[list[int]],
            tag: str) -> ModeResult:
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    before = engine.get_stats()
    finals, wall = run_batch(engine, prompts, params, tag)
    after = engine.get_stats()
    outs = list(finals.values())
    assert len(outs) == len(prompts), f"{len(outs)} of {len(prompts)} requests finished"
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]  # type: ignore[union-attr,operator]
    e2e = [o.metrics.finished_time - o.metrics.arrival_time for o in outs]  # type: ignore[union-attr,operator]
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    queries = after.prefix_cache_queries_total - before.prefix_cache_queries_total
    hits = after.prefix_cache_hits_total - before.prefix_cache_hits_total
    return ModeResult(
        mode="on" if enable else "off",
        num_requests=len(outs),
        num_gpu_blocks=engine.num_blocks,
        ttft_p50_s=percentile(ttft, 50),
        ttft_p99_s=percentile(ttft, 99),
        ttft_mean_s=statistics.fmean(ttft),
        e2e_p50_s=percentile(e2e, 50),
        wall_s=wall,
        output_tokens=num_out,
        throughput_tok_s=num_out / wall,
        prefix_cache_queries=queries,
        prefix_cache_hits=hits,
        hit_rate=hits / queries if queries else 0.0,
        cached_tokens_reported=sum(o.num_cached_tokens for o in outs),
        preemptions=after.num_preemptions_total - before.num_preemptions_total,
        evicted_blocks=after.prefix_cache_evicted_blocks_total - before.prefix_cache_evicted_blocks_total,
        steps=after.num_steps_total - before.num_steps_total,
        ttft_s=ttft,
    )


def device_name(device: str | None) -> str:
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device or "cuda"))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_table(header: str, results: list[ModeResult], speedup: float) -> None:
    print(header)
    cols = ("prefix cache", "TTFT p50 s", "TTFT p99 s", "e2e p50 s", "tok/s", "hit rate", "preempt", "wall s")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in results:
        row = (r.mode, f"{r.ttft_p50_s:.4f}", f"{r.ttft_p99_s:.4f}", f"{r.e2e_p50_s:.4f}",
               f"{r.throughput_tok_s:,.0f}", f"{r.hit_rate:.1%}", str(r.preemptions), f"{r.wall_s:.2f}")
        print("| " + " | ".join(row) + " |")
    verdict = "meets" if speedup >= TARGET_TTFT_P50_SPEEDUP else "BELOW"
    print(f"TTFT p50 speedup (off / on): {speedup:.2f}x ({verdict} the >= {TARGET_TTFT_P50_SPEEDUP:g}x target)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1b", help="random checkpoint shape from bench/shapes.py (tiny|1b|8b)")
    p.add_argument("--model", default=None, help="use this HF checkpoint directory instead of a random shape")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--shared-fraction", type=float, default=0.9)
    p.add_argument("--prefix-len", type=int, default=2048)
    p.add_argument("--suffix-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: --num-requests")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the engine's")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="split between the two engines")
    p.add_argument("--num-gpu-blocks", type=int, default=None, help="force the KV pool size (both modes)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--num-warmup", type=int, default=4, help="warm-up requests per wave, 2 waves (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="interleaved off/on repeats; the median speedup counts")
    p.add_argument("--out", default=os.path.join("bench", "results", "prefix_cache.json"))
    p.add_argument("--fail-below-target", action="store_true", help="exit 1 when the speedup misses the target")
    args = p.parse_args(argv)
    if not 0.0 <= args.shared_fraction <= 1.0:
        p.error("--shared-fraction must be in [0, 1]")
    if args.dtype is None:
        on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        args.dtype = "bfloat16" if on_cuda else "float32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    model = args.model or make_random_checkpoint(args.shape, dtype=args.dtype, seed=args.seed)
    vocab_size = json.load(open(os.path.join(model, "config.json"), encoding="utf-8"))["vocab_size"]
    checkpoint_s = time.monotonic() - t0
    warmup = make_warmup(args, vocab_size, args.seed + 1)
    engines = {}
    for enable in (False, True):
        engines[enable] = make_engine(args, model, enable)
        warm_up(engines[enable], warmup)
    gc.collect()
    gc.freeze()  # the engines' objects stay out of the collector's full passes mid-run
    runs: dict[bool, list[ModeResult]] = {False: [], True: []}
    num_shared = 0
    for r in range(args.repeats):  # interleaved; a fresh shared prefix per repeat (no hits across repeats)
        prompts, num_shared = make_prompts(args, vocab_size, args.seed + 100 * r)
        for enable in (False, True):
            runs[enable].append(measure(args, engines[enable], enable, prompts, f"r{r}"))
    del engines
    speedups = [off.ttft_p50_s / on.ttft_p50_s for off, on in zip(runs[False], runs[True], strict=True)]
    speedup = statistics.median(speedups)
    median_run = {enable: sorted(rs, key=lambda m: m.ttft_p50_s)[len(rs) // 2] for enable, rs in runs.items()}
    results = [median_run[False], median_run[True]]
    device = device_name(args.device)
    header = (
        f"prefix cache: {args.shape if args.model is None else args.model}, {args.dtype}, {device}; "
        f"{args.num_requests} requests at once ({num_shared} share a {args.prefix_len}-token prefix, "
        f"+{args.suffix_len} unique tokens), {args.max_tokens} new tokens each, block {args.block_size}; "
        f"{args.repeats} interleaved repeats, the median repeat of each mode shown"
    )
    print_table(header, results, speedup)
    print("TTFT p50 speedup per repeat (same-repeat off / on): " + ", ".join(f"{x:.2f}x" for x in speedups))
    report: dict[str, Any] = {
        "bench": "prefix_cache",
        "device": device,
        "commit": os.environ.get("INFERGRID_COMMIT"),
        "command": " ".join([sys.executable, *sys.argv]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "shape": None if args.model else {"name": args.shape, **asdict(get_shape(args.shape))},
        "args": vars(args),
        "num_shared_prefix_requests": num_shared,
        "checkpoint_seconds": checkpoint_s,
        "results": {r.mode: asdict(r) for r in results},
        "runs": {("on" if enable else "off"): [asdict(m) for m in rs] for enable, rs in runs.items()},
        "ttft_p50_speedups": speedups,
        "ttft_p50_speedup": speedup,
        "target_ttft_p50_speedup": TARGET_TTFT_P50_SPEEDUP,
        "meets_target": speedup >= TARGET_TTFT_P50_SPEEDUP,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 1 if args.fail_below_target and speedup < TARGET_TTFT_P50_SPEEDUP else 0


if __name__ == "__main__":
    sys.exit(main())
