"""Offline throughput against the card's own ceilings: our engine (the offline `LLM` API, as a new user
calls it) and transformers' continuous batching (`generate_batch`) on the same workload, same
random-weight checkpoint (bench/shapes.py; default the Llama-3.2-1B shape in bf16), same process.

Workloads (greedy, ignore_eos, prompts of random token ids):
- "mixed256": 256 requests at once, prompt lengths uniform in [128, 1024), 256 new tokens each;
- "b64": 64 requests of 128 prompt tokens, 256 new tokens each;
- "b1": one request of 128 prompt tokens, 256 new tokens.

The card's ceilings are measured in the same run, before the workloads: copy bandwidth (a 2 GiB
device-to-device copy, bytes read + written over the median time) and the bf16 matrix rate (an
8192^3 product on random data). From them:
- batch-1 roofline tok/s = bandwidth / bytes per decode step (every weight once, the KV read at the
  mean context); "of roofline" = measured / roofline;
- the mixed256 floor (seconds) = prefill FLOPs (2 x non-embedding params per prompt token, the LM
  head once per prompt, causal attention) / matrix rate + for each of the 255 decode steps
  max(bytes / bandwidth, FLOPs / matrix rate), bytes = all weights + every sequence's KV at that
  step; "of floor" = floor / measured wall time (= measured tok/s over the floor's tok/s).

Repeats are interleaved (repeat r runs every workload once, ours then transformers') so that drifts of
the machine hit every mode alike; the table gives medians and [min-max]. Transformers' slower runs
repeat --hf-repeats times (default 1: ~1 min per mixed256 run on an H100). Each transformers call is
timed whole (it builds its paged cache and scheduler per call, as a user's call does), after a small
warm-up call. Greedy tokens of ours and transformers' are compared on mixed256 (reported, not asserted:
bf16 kernels of different shapes may flip near-ties, after which the texts part).

    PYTHONPATH=worker/src python bench/bench_offline.py --out bench/results/offline_h100.json     # GPU
    .venv/bin/python bench/bench_offline.py --smoke                                                   # CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shapes import FIRST_TOKEN_ID, Shape, get_shape, make_random_checkpoint  # noqa: E402

from infergrid.worker.llm import LLM  # noqa: E402
from infergrid.worker.sampling_params import SamplingParams  # noqa: E402


@dataclass
class Workload:
    """One named batch: its prompts (token ids) and the new tokens each generates."""

    name: str
    prompts: list[list[int]]
    max_tokens: int


@dataclass
class Runs:
    """The timed runs of one (workload, engine)."""

    workload: str
    engine: str
    wall_s: list[float] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)

    @property
    def tok_s(self) -> list[float]:
        return [n / w for n, w in zip(self.output_tokens, self.wall_s, strict=True)]


def make_workloads(args: argparse.Namespace, vocab_size: int) -> list[Workload]:
    rng = random.Random(args.seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(n)]

    lo, hi = args.mixed_prompt_range
    out = []
    for name in args.workloads:
        if name == "mixed256":
            out.append(Workload(name, [ids(rng.randrange(lo, hi)) for _ in range(args.mixed_requests)],
                                args.max_tokens))
        elif name == "b64":
            out.append(Workload(name, [ids(args.short_prompt) for _ in range(args.b64_requests)], args.max_tokens))
        elif name == "b1":
            out.append(Workload(name, [ids(args.short_prompt)], args.max_tokens))
        else:
            raise ValueError(f"unknown workload {name!r}")
    return out


# ---- the card's ceilings ------------------------------------------------------------------------

def _median_ms(fn: Any, iters: int) -> float:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_ceilings(smoke: bool) -> dict[str, float]:
    """Copy bandwidth (bytes/s, read + written) and bf16 matrix rate (FLOP/s), measured now."""
    if not torch.cuda.is_available():
        return {"copy_bytes_per_s": float("nan"), "bf16_flop_per_s": float("nan")}
    n = (64 << 20) if smoke else (1 << 30)  # bf16 elements: 2 GiB a buffer
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = _median_ms(lambda: dst.copy_(src), 20)
    bw = 2 * src.numel() * src.element_size() / (ms / 1e3)
    m = 2048 if smoke else 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ms = _median_ms(lambda: a @ b, 20)
    rate = 2 * m ** 3 / (ms / 1e3)
    return {"copy_bytes_per_s": bw, "bf16_flop_per_s": rate}


def model_costs(shape: Shape, dtype_bytes: int) -> dict[str, float]:
    h, kv = shape.hidden_size, shape.num_key_value_heads * shape.head_dim
    layer_params = shape.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * shape.intermediate_size)
    return {
        "weight_bytes": shape.num_params() * dtype_bytes,
        "layer_params": layer_params,
        "lm_head_params": shape.vocab_size * h,
        "kv_bytes_per_token": 2 * shape.num_hidden_layers * kv * dtype_bytes,
        "attn_dim": shape.num_attention_heads * shape.head_dim,
    }


def decode_step_floor_s(costs: dict[str, float], contexts: list[int], bw: float, rate: float) -> float:
    """One decode step of sequences at `contexts`: max(bytes / bandwidth, FLOPs / matrix rate)."""
    n, ctx = len(contexts), sum(contexts)
    nbytes = costs["weight_bytes"] + ctx * costs["kv_bytes_per_token"]
    flops = 2 * n * (costs["layer_params"] + costs["lm_head_params"]) + 4 * ctx * costs["attn_dim"] * costs["layers"]  # QK^T + PV
    return max(nbytes / bw, flops / rate)


def workload_floor_s(costs: dict[str, float], wl: Workload, bw: float, rate: float) -> dict[str, float]:
    """The physical floor of a workload (module docstring): prefill at the matrix rate, then each
    decode step at the larger of its memory and matrix times."""
    lens = [len(p) for p in wl.prompts]
    prefill_flops = sum(2 * n * costs["layer_params"] + 2 * costs["lm_head_params"]
                        + 2 * costs["layers"] * costs["attn_dim"] * n * n for n in lens)  # causal QK^T + PV
    prefill_s = max(prefill_flops / rate, costs["weight_bytes"] / bw)
    decode_s = sum(decode_step_floor_s(costs, [n + i for n in lens], bw, rate) for i in range(1, wl.max_tokens))
    return {"prefill_s": prefill_s, "decode_s": decode_s, "floor_s": prefill_s + decode_s,
            "prefill_tflop": prefill_flops / 1e12}


# ---- the engines ----------------------------------------------------------------------------------

def run_ours(llm: LLM, wl: Workload) -> tuple[float, int, list[list[int]]]:
    params = SamplingParams(temperature=0.0, max_tokens=wl.max_tokens, ignore_eos=True)
    sync()
    start = time.perf_counter()
    outs = llm.generate(wl.prompts, params)
    wall = time.perf_counter() - start
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    return wall, sum(len(t) for t in tokens), tokens


def run_hf(model: Any, wl: Workload) -> tuple[float, int, list[list[int]]]:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=wl.max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0,
                           bos_token_id=1)
    sync()
    start = time.perf_counter()
    outs = model.generate_batch(inputs=wl.prompts, generation_config=cfg)
    sync()
    wall = time.perf_counter() - start
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for o in outs.values():
        by_prompt[tuple(o.prompt_ids)] = list(o.generated_tokens)
    tokens = [by_prompt.get(tuple(p), []) for p in wl.prompts]
    return wall, sum(len(o.generated_tokens) for o in outs.values()), tokens


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """Share of identical sequences, and the mean share of tokens before the first difference."""
    same = sum(x == y for x, y in zip(a, b, strict=True))
    prefix = []
    for x, y in zip(a, b, strict=True):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefix.append(k / max(len(x), 1))
    return {"identical_share": same / len(a), "mean_common_prefix_share": statistics.fmean(prefix)}


# ---- report -------------------------------------------------------------------------------------------

def git_commit() -> str:
    if os.environ.get("INFERGRID_COMMIT"):
        return os.environ["INFERGRID_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def fmt_range(values: list[float], fmt: str = ",.0f") -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1b")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--workloads", nargs="+", default=["mixed256", "b64", "b1"])
    p.add_argument("--hf-workloads", nargs="*", default=["mixed256"],
                   help="workloads transformers also runs (slow: ~1 min for mixed256 on an H100)")
    p.add_argument("--mixed-requests", type=int, default=256)
    p.add_argument("--mixed-prompt-range", type=int, nargs=2, default=[128, 1024])
    p.add_argument("--b64-requests", type=int, default=64)
    p.add_argument("--short-prompt", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hf-repeats", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.45,
                   help="our engine's share; transformers' paged cache takes from the rest")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny shape, small workloads (CPU check of the script)")
    p.add_argument("--out", default=os.path.join("bench", "results", "offline.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.shape = "tiny"
        args.mixed_requests, args.mixed_prompt_range, args.b64_requests = 8, [8, 32], 4
        args.short_prompt, args.max_tokens, args.repeats = 8, 8, 2
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench_offline.py", *argv])
    shape = get_shape(args.shape)
    model_dir = make_random_checkpoint(args.shape, dtype=args.dtype, seed=args.seed)
    workloads = make_workloads(args, shape.vocab_size)
    ceilings = measure_ceilings(args.smoke)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the ceilings' buffers are gone with the function
    bw, rate = ceilings["copy_bytes_per_s"], ceilings["bf16_flop_per_s"]
    dtype_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
    costs = model_costs(shape, dtype_bytes)
    costs["layers"] = shape.num_hidden_layers

    max_len = max(len(p) for wl in workloads for p in wl.prompts) + args.max_tokens
    llm = LLM(model_dir, dtype=args.dtype, max_model_len=max_len, max_num_seqs=max(args.mixed_requests, 64),
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager, seed=args.seed)
    hf_model = None
    if args.hf_workloads:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, args.dtype)).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    # Warm-up: every workload shape once through ours, a small batch through transformers.
    for wl in workloads:
        run_ours(llm, Workload(wl.name, wl.prompts[: max(1, len(wl.prompts) // 4)], 8))
    hf_errors: list[str] = []
    if hf_model is not None:
        try:
            run_hf(hf_model, Workload("warmup", workloads[0].prompts[:8], 8))
        except Exception as exc:  # noqa: BLE001
            hf_errors.append(f"warmup: {type(exc).__name__}: {exc}")
            print("transformers failed:", hf_errors[-1], flush=True)
    gc.collect()
    gc.freeze()

    runs = {(wl.name, eng): Runs(wl.name, eng) for wl in workloads for eng in ("ours", "transformers")}
    tokens: dict[tuple[str, str], list[list[int]]] = {}
    for r in range(args.repeats):
        for wl in workloads:
            wall, n, toks = run_ours(llm, wl)
            runs[(wl.name, "ours")].wall_s.append(wall)
            runs[(wl.name, "ours")].output_tokens.append(n)
            tokens.setdefault((wl.name, "ours"), toks)
            if hf_model is not None and wl.name in args.hf_workloads and r < args.hf_repeats:
                try:
                    wall, n, toks = run_hf(hf_model, wl)
                except Exception as exc:  # noqa: BLE001 - keep our numbers when transformers' API moves
                    hf_errors.append(f"{wl.name}: {type(exc).__name__}: {exc}")
                    print("transformers failed:", hf_errors[-1], flush=True)
                    continue
                runs[(wl.name, "transformers")].wall_s.append(wall)
                runs[(wl.name, "transformers")].output_tokens.append(n)
                tokens.setdefault((wl.name, "transformers"), toks)
            print(f"repeat {r}: {wl.name} done", flush=True)

    rows = []
    for wl in workloads:
        ours, hf = runs[(wl.name, "ours")], runs[(wl.name, "transformers")]
        floor = workload_floor_s(costs, wl, bw, rate)
        floor_tok_s = len(wl.prompts) * wl.max_tokens / floor["floor_s"]
        med = statistics.median(ours.tok_s)
        row: dict[str, Any] = {
            "workload": wl.name, "requests": len(wl.prompts), "prompt_tokens": sum(len(p) for p in wl.prompts),
            "max_tokens": wl.max_tokens, "ours_tok_s": ours.tok_s, "ours_wall_s": ours.wall_s,
            "ours_output_tokens": ours.output_tokens, "ours_tok_s_median": med,
            "transformers_tok_s": hf.tok_s, "transformers_wall_s": hf.wall_s,
            "transformers_output_tokens": hf.output_tokens,
            "ratio_to_transformers": med / statistics.median(hf.tok_s) if hf.tok_s else None,
            "floor": floor, "floor_tok_s": floor_tok_s, "fraction_of_floor": med / floor_tok_s,
        }
        if wl.name == "b1":
            step_bytes = costs["weight_bytes"] + (len(wl.prompts[0]) + wl.max_tokens / 2) * costs["kv_bytes_per_token"]
            row["roofline_tok_s"] = bw / step_bytes
            row["fraction_of_roofline"] = med / row["roofline_tok_s"]
        if (wl.name, "transformers") in tokens:
            row["greedy_agreement"] = agreement(tokens[(wl.name, "ours")], tokens[(wl.name, "transformers")])
        rows.append(row)

    dev = device_name()
    print(f"\noffline: {args.shape}, {args.dtype}, {dev}; copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s; "
          f"{args.repeats} interleaved repeats (transformers {args.hf_repeats}), median [min-max]")
    cols = ("workload", "ours tok/s", "transformers tok/s", "ratio", "floor tok/s", "of floor", "b1 of roofline")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for row in rows:
        print("| " + " | ".join((
            f"{row['workload']} ({row['requests']} req)", fmt_range(row["ours_tok_s"]), fmt_range(row["transformers_tok_s"]),
            f"{row['ratio_to_transformers']:.1f}x" if row["ratio_to_transformers"] else "-",
            f"{row['floor_tok_s']:,.0f}", f"{row['fraction_of_floor']:.0%}",
            f"{row['fraction_of_roofline']:.0%} of {row['roofline_tok_s']:,.0f}" if "fraction_of_roofline" in row else "-",
        )) + " |")
    for row in rows:
        if "greedy_agreement" in row:
            g = row["greedy_agreement"]
            print(f"{row['workload']}: greedy vs transformers: {g['identical_share']:.0%} identical, "
                  f"{g['mean_common_prefix_share']:.0%} mean common prefix")
    import transformers

    report = {
        "bench": "offline", "device": dev, "commit": git_commit(), "command": command,
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "python": platform.python_version(), "shape": {"name": args.shape, **asdict(shape)},
        "args": vars(args), "ceilings": ceilings, "costs": costs, "rows": rows, "transformers_errors": hf_errors,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
