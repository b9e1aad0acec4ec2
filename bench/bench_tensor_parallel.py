"""Tensor-parallel benchmark: per-token decode latency at TP=1 vs TP=2 (and TP=4), same run.

The model is a random-weight checkpoint of a named shape (bench/shapes.py; default the Llama-3.1-8B
shape in bf16: hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocab 128256).
Each TP size runs in its own process (fresh CUDA context and process group) with the offline
engine: a warm-up batch, then per batch size B, B requests of --prompt-len random tokens decoding
--decode-tokens tokens each (greedy, ignore_eos). The per-token latency is the wall time between two
successive tokens of the batch coming out of `engine.step()` (with async scheduling, the default, a
step returns the previous step's tokens while its own runs on the GPU). `--sync-baseline` also runs
every TP size with async scheduling off (the host's work then sits between the GPU's steps).

    PYTHONPATH=worker/src python bench/bench_tensor_parallel.py --out bench/results/tensor_parallel.json  # GPUs
    .venv/bin/python bench/bench_tensor_parallel.py --shape tiny --tp 1 2        # CPU smoke run (gloo)

Prints a table and writes JSON (--out). Target (SPEC): TP=2 per-token latency <= 0.6x TP=1 (8B shape).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import multiprocessing
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shapes import FIRST_TOKEN_ID, get_shape, make_random_checkpoint  # noqa: E402

TARGET_TP2_LATENCY_RATIO = 0.6


@dataclass
class BatchResult:
    """Decode steps of one TP size at one batch size."""

    tp: int
    scheduling: str  # "async" | "sync"
    batch_size: int
    num_decode_steps: int
    latency_p50_ms: float
    latency_p90_ms: float
    latency_mean_ms: float
    tokens_per_s: float
    prefill_ms: float


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(length)] for _ in range(n)]


def run_batch(engine: Any, prompts: list[list[int]], max_tokens: int, tag: str) -> tuple[float, list[float]]:
    """(seconds to the first token, seconds between successive tokens) of one batch admitted at once."""
    from infergrid.worker.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    arrivals = [time.perf_counter()]
    num_finished = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        if outs:
            arrivals.append(time.perf_counter())
            assert len(outs) == len(prompts), f"{len(outs)} of {len(prompts)} requests got a token"
        num_finished += sum(o.finished for o in outs)
    assert num_finished == len(prompts), f"{num_finished} of {len(prompts)} requests finished"
    assert len(arrivals) == 1 + max_tokens, f"expected {max_tokens} token arrivals, got {len(arrivals) - 1}"
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return gaps[0], gaps[1:]


def dump_stacks_later(seconds: float) -> threading.Timer:
    """Before the parent gives up on this child: print this process's stacks and ask every rank it
    spawned for theirs (ranks dump on SIGUSR1), so a hang shows where it is."""
    def dump() -> None:
        print(f"--- no result after {seconds:.0f}s; stacks of rank 0 and its ranks follow ---", file=sys.stderr)
        faulthandler.dump_traceback(all_threads=True)
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGUSR1)  # type: ignore[arg-type]

    timer = threading.Timer(seconds, dump)
    timer.daemon = True
    timer.start()
    return timer


def run_one_tp(args: argparse.Namespace, model: str, tp: int, out: str, is_async: bool) -> dict[str, Any]:
    """Runs inside the per-TP child process; writes its results to `out` (JSON)."""
    from infergrid.worker.config import EngineConfig
    from infergrid.worker.engine.llm_engine import LLMEngine

    max_bs = max(args.batch_sizes)
    config = EngineConfig(
        model=model, dtype=args.dtype, device=args.device, tensor_parallel_size=tp,
        max_model_len=args.prompt_len + max(args.decode_tokens + 1, args.warmup_tokens), max_num_seqs=max_bs,
        max_num_batched_tokens=max(2048, max_bs * args.prompt_len), block_size=16,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
        enable_prefix_caching=False, async_scheduling=is_async,
    )
    t0 = time.monotonic()
    engine = LLMEngine(config)
    load_s = time.monotonic() - t0
    vocab = engine.model_config.vocab_size
    try:
        run_batch(engine, random_prompts(max_bs, args.prompt_len, vocab, args.seed + 99), args.warmup_tokens, "warm")
        results = []
        for bs in args.batch_sizes:
            prefill, decode = run_batch(engine, random_prompts(bs, args.prompt_len, vocab, args.seed + bs),
                                        args.decode_tokens + 1, f"b{bs}")
            p50 = percentile(decode, 50)
            results.append(BatchResult(
                tp=tp, scheduling="async" if is_async else "sync", batch_size=bs, num_decode_steps=len(decode), latency_p50_ms=p50 * 1e3,
                latency_p90_ms=percentile(decode, 90) * 1e3, latency_mean_ms=statistics.fmean(decode) * 1e3,
                tokens_per_s=bs / p50, prefill_ms=prefill * 1e3,
            ))
        info = {"tp": tp, "scheduling": "async" if is_async else "sync", "load_s": load_s, "num_gpu_blocks": engine.num_blocks,
                "rank_pids": engine.model_executor.rank_pids,
                "cuda_graphs": engine.model_runner.decode_graphs is not None,
                "results": [asdict(r) for r in results]}
        with open(out, "w", encoding="utf-8") as f:  # before profiling: a profiler failure loses no result
            json.dump(info, f)
        if args.profile_dir:
            info["gpu_busy_ms_per_step_b1"] = profile_decode(engine, args, vocab, tp)
            with open(out, "w", encoding="utf-8") as f:
                json.dump(info, f)
    finally:
        engine.shutdown()
    return info


def gpu_busy_ms(trace_path: str) -> float:
    """Milliseconds in which the device ran something (kernels, copies, memsets; overlaps counted
    once) in a Chrome trace written by torch.profiler."""
    with open(trace_path, encoding="utf-8") as f:
        events = json.load(f)["traceEvents"]
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1000.0


def profile_decode(engine: Any, args: argparse.Namespace, vocab: int, tp: int) -> float:
    """Rank 0's kernels over 16 batch-1 decode steps (torch.profiler), as a table and a Chrome trace
    in --profile-dir; returns rank 0's GPU-busy milliseconds per step."""
    from torch.profiler import ProfilerActivity, profile

    from infergrid.worker.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    engine.add_request("prof", random_prompts(1, 16, vocab, args.seed + 7)[0], params)
    for _ in range(4):  # prefill + warm decode steps
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(16):
            engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    os.makedirs(args.profile_dir, exist_ok=True)
    tag = f"tp{tp}" + ("" if engine.config.async_scheduling else "_sync")
    with open(os.path.join(args.profile_dir, f"profile_{tag}.txt"), "w", encoding="utf-8") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70))
    trace = os.path.join(args.profile_dir, f"trace_{tag}.json")
    prof.export_chrome_trace(trace)
    return gpu_busy_ms(trace) / 16


def device_name(device: str | None) -> str:
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def print_table(header: str, results: list[BatchResult], ratios: dict[str, float]) -> None:
    print(header)
    cols = ("TP", "scheduling", "batch", "decode ms/token p50", "p90", "mean", "tok/s", "vs TP=1", "prefill ms")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in results:
        ratio = ratios.get(ratio_key(r))
        row = (str(r.tp), r.scheduling, str(r.batch_size), f"{r.latency_p50_ms:.3f}", f"{r.latency_p90_ms:.3f}",
               f"{r.latency_mean_ms:.3f}", f"{r.tokens_per_s:,.1f}", "-" if ratio is None else f"{ratio:.3f}x",
               f"{r.prefill_ms:.1f}")
        print("| " + " | ".join(row) + " |")
    if "sync_tp2_b1" in ratios:
        print(f"(async scheduling off: TP=2 / TP=1 at batch 1 = {ratios['sync_tp2_b1']:.3f}x)")
    if "tp2_b1" in ratios:
        verdict = "meets" if ratios["tp2_b1"] <= TARGET_TP2_LATENCY_RATIO else "MISSES"
        print(f"TP=2 / TP=1 per-token latency at batch 1: {ratios['tp2_b1']:.3f}x "
              f"({verdict} the <= {TARGET_TP2_LATENCY_RATIO:g}x target)")


def ratio_key(r: BatchResult) -> str:
    return ("" if r.scheduling == "async" else "sync_") + f"tp{r.tp}_b{r.batch_size}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8b", help="random checkpoint shape from bench/shapes.py (tiny|1b|8b)")
    p.add_argument("--model", default=None, help="use this HF checkpoint directory instead of a random shape")
    p.add_argument("--tp", type=int, nargs="+", default=None,
                   help="TP sizes (default: 1 2, plus 4 with 4+ GPUs; the first is the baseline)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=128, help="decode steps measured per batch")
    p.add_argument("--warmup-tokens", type=int, default=8)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--sync-baseline", action="store_true", help="also run every TP size with async scheduling off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile-dir", default=None, help="write each TP size's kernel profile (16 decode steps) here")
    p.add_argument("--out", default=os.path.join("bench", "results", "tensor_parallel.json"))
    p.add_argument("--fail-below-target", action="store_true", help="exit 1 when TP=2 misses 0.6x of TP=1")
    p.add_argument("--child-timeout", type=float, default=900.0,
                   help="seconds one TP size may take (load included) before it is reported hung")
    p.add_argument("--child-tp", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-sync", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.dtype is None:
        args.dtype = "bfloat16" if on_cuda else "float32"
    if args.tp is None:
        args.tp = [1, 2] + ([4] if on_cuda and torch.cuda.device_count() >= 4 else [])
    return args


def run_children(args: argparse.Namespace, argv: list[str], model: str) -> list[dict[str, Any]]:
    infos = []
    with tempfile.TemporaryDirectory() as tmp:
        for tp, is_sync in [(tp, is_sync) for is_sync in [False, True][: 1 + args.sync_baseline] for tp in args.tp]:
            out = os.path.join(tmp, f"tp{tp}{'_sync' if is_sync else ''}.json")
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child-tp", str(tp), "--child-model", model,
                   "--child-out", out, *(["--child-sync"] if is_sync else [])]
            print(f"running TP={tp}{' (async scheduling off)' if is_sync else ''} ...", flush=True)
            try:
                subprocess.run(cmd, check=True, timeout=args.child_timeout)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                if not os.path.exists(out):
                    raise
                print(f"TP={tp}: {exc} after writing its results (profiling or shutdown failed)", flush=True)
            with open(out, encoding="utf-8") as f:
                infos.append(json.load(f))
    return infos


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child_tp is not None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(name)s: %(message)s")
        dump_stacks_later(max(1.0, args.child_timeout - 10.0))
        run_one_tp(args, args.child_model, args.child_tp, args.child_out, is_async=not args.child_sync)
        return 0
    t0 = time.monotonic()
    model = args.model or make_random_checkpoint(args.shape, dtype=args.dtype, seed=args.seed)
    checkpoint_s = time.monotonic() - t0
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the children get the GPUs; keep none of their memory here
    infos = run_children(args, argv, model)
    results = [BatchResult(**r) for info in infos for r in info["results"]]
    base = {(r.scheduling, r.batch_size): r.latency_p50_ms for r in results if r.tp == args.tp[0]}
    ratios = {ratio_key(r): r.latency_p50_ms / base[r.scheduling, r.batch_size]
              for r in results if r.tp != args.tp[0]}
    device = device_name(args.device)
    header = (f"tensor parallel: {args.shape if args.model is None else args.model}, {args.dtype}, {device}; "
              f"prompt {args.prompt_len} tokens, {args.decode_tokens} decode steps per batch, "
              f"TP sizes {args.tp} (baseline TP={args.tp[0]})")
    print_table(header, results, ratios)
    for info in infos:
        busy = info.get("gpu_busy_ms_per_step_b1")
        p50 = next((r["latency_p50_ms"] for r in info["results"] if r["batch_size"] == 1), None)
        if busy and p50 is not None:  # (no device events on CPU)
            print(f"TP={info['tp']} ({info['scheduling']}) batch 1: rank 0's GPU busy {busy:.3f} ms per step (profiled), "
                  f"host gap {p50 - busy:.3f} ms of the {p50:.3f} ms p50")
    tp2_ratio = ratios.get("tp2_b1")
    report: dict[str, Any] = {
        "bench": "tensor_parallel",
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "shape": None if args.model else {"name": args.shape, **asdict(get_shape(args.shape))},
        "args": {k: v for k, v in vars(args).items() if not k.startswith("child_")},
        "checkpoint_seconds": checkpoint_s,
        "runs": [{k: v for k, v in info.items() if k != "results"} for info in infos],
        "results": [asdict(r) for r in results],
        "latency_ratio_vs_baseline": ratios,
        "target_tp2_latency_ratio": TARGET_TP2_LATENCY_RATIO,
        "meets_target": None if tp2_ratio is None else tp2_ratio <= TARGET_TP2_LATENCY_RATIO,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 1 if args.fail_below_target and tp2_ratio is not None and tp2_ratio > TARGET_TP2_LATENCY_RATIO else 0


if __name__ == "__main__":
    sys.exit(main())
