"""Serving benchmark: an OpenAI-API load generator against a running worker (or router), reporting what
`vllm bench serve` reports: TTFT, TPOT, ITL and E2E latency (mean, p50, p99), request and token
throughput, failures.

Requests are streamed POST /v1/completions (greedy, ignore_eos, `stream_options.include_usage`) with
token-id prompts, so a prompt's length is exact for any tokenizer. Datasets:
- "random": --num-prompts prompts of random token ids, input lengths uniform in
  [input_len * (1 - range_ratio), input_len * (1 + range_ratio)], output --output-len tokens each;
- "shared-prefix": a --shared-fraction of the prompts start with one --prefix-len-token prefix,
  followed by --input-len unique tokens; the rest are unique prompts of the same total length.
Arrivals: Poisson at --request-rate requests/s (inter-arrival times exponential, seeded; "inf" sends
all at once), capped at --max-concurrency requests in flight when given. Several rates run in one
call (--request-rate 2 8 inf), --repeats times, interleaved (repeat r runs every rate once); each
(rate, repeat) gets fresh prompt token ids, so the prefix cache cannot serve one repeat from another's
prompts (the shared-prefix dataset keeps its prefix per repeat), while the prompt lengths and the
arrival times are the same in every repeat of a rate, so repeats differ only by the system's noise.

Metrics per request: TTFT = first streamed token - request sent; ITL = the gaps between streamed
chunks (one token per chunk); TPOT = (E2E - TTFT) / (output tokens - 1); E2E = last byte - sent.
Throughput = completed requests (or tokens) / the run's duration (first send to last completion).
A request fails on a non-200 status, a broken stream or fewer tokens than asked.

    # against a running worker:
    python bench/bench_serving.py --base-url http://127.0.0.1:8000 --request-rate 4 16 inf
    # start one (random 1B-shape checkpoint, bench/shapes.py), run, stop it:
    PYTHONPATH=worker/src python bench/bench_serving.py --launch-shape 1b --request-rate 8 32 inf --repeats 2
    .venv/bin/python bench/bench_serving.py --smoke     # CPU: tiny shape, a few requests

Prints a report per (rate, repeat) and a summary table; writes JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FIRST_TOKEN_ID = 3  # ids below are the random checkpoints' specials (bench/shapes.py)


@dataclass
class RequestResult:
    """One request's outcome and timings (seconds, relative to its send)."""

    prompt_len: int
    output_len: int = 0
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def make_prompts(args: argparse.Namespace, vocab_size: int, seed: int, shape_seed: int) -> list[list[int]]:
    """The dataset's prompts: lengths and order from `shape_seed` (the same in every repeat of a rate,
    so repeats measure the system, not a different workload), token ids from `seed` (fresh per repeat,
    so the prefix cache cannot serve one repeat from another's prompts)."""
    rng, shape = random.Random(seed), random.Random(shape_seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(n)]

    if args.dataset == "random":
        lo = max(1, int(args.input_len * (1 - args.range_ratio)))
        hi = max(lo, int(args.input_len * (1 + args.range_ratio)))
        return [ids(shape.randint(lo, hi)) for _ in range(args.num_prompts)]
    num_shared = round(args.num_prompts * args.shared_fraction)
    prefix = ids(args.prefix_len)
    prompts = [prefix + ids(args.input_len) for _ in range(num_shared)]
    prompts += [ids(args.prefix_len + args.input_len) for _ in range(args.num_prompts - num_shared)]
    shape.shuffle(prompts)
    return prompts


async def send_one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], output_len: int,
                   headers: dict[str, str]) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    res = RequestResult(prompt_len=len(prompt))
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if msg.get("usage"):
                    res.output_len = msg["usage"].get("completion_tokens", 0)
                if not msg.get("choices"):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
                chunks += 1
        res.e2e = time.perf_counter() - start
        if res.output_len < output_len:
            res.error = f"{res.output_len} of {output_len} tokens"
        else:
            res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def run_load(base_url: str, model: str, prompts: list[list[int]], output_len: int, rate: float,
                   max_concurrency: int | None, seed: int, api_key: str | None) -> tuple[list[RequestResult], float]:
    """Send every prompt on a Poisson schedule (rate inf: at once); returns (results, duration)."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(None, connect=30.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
        async def guarded(p: list[int]) -> RequestResult:
            if sem is None:
                return await send_one(client, "/v1/completions", model, p, output_len, headers)
            async with sem:
                return await send_one(client, "/v1/completions", model, p, output_len, headers)

        tasks = []
        start = time.perf_counter()
        for p in prompts:
            tasks.append(asyncio.create_task(guarded(p)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ms = 1e3

    def stats(name: str, values: list[float]) -> dict[str, float]:
        return {f"mean_{name}_ms": statistics.fmean(values) * ms if values else float("nan"),
                f"median_{name}_ms": percentile(values, 50) * ms, f"p99_{name}_ms": percentile(values, 99) * ms}

    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    summary: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    summary |= stats("ttft", [r.ttft for r in ok])
    summary |= stats("tpot", [(r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1])
    summary |= stats("itl", [x for r in ok for x in r.itl])
    summary |= stats("e2el", [r.e2e for r in ok])
    summary["errors"] = sorted({r.error for r in results if not r.ok})[:5]
    return summary


def print_report(title: str, s: dict[str, Any]) -> None:
    """The `vllm bench serve` layout."""
    print("{s:{c}^60}".format(s=f" {title} ", c="="))
    rows = [("Successful requests:", s["completed"]), ("Failed requests:", s["failed"]),
            ("Benchmark duration (s):", f"{s['duration_s']:.2f}"),
            ("Total input tokens:", s["total_input_tokens"]), ("Total generated tokens:", s["total_output_tokens"]),
            ("Request throughput (req/s):", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")]
    for label, value in rows:
        print(f"{label:<44}{value:>16}")
    for key, name in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                      ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        print("{s:{c}^60}".format(s=name, c="-"))
        for stat in ("mean", "median", "p99"):
            label = f"{stat.capitalize() if stat != 'p99' else 'P99'} {key.upper()} (ms):"
            print(f"{label:<44}{s[f'{stat}_{key}_ms']:>16.2f}")
    if s["errors"]:
        print("errors:", *s["errors"], sep="\n  ")
    print("=" * 60)


# ---- an optional worker of our own ----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_worker(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start `infergrid-worker serve` on a random checkpoint of --launch-shape; returns (proc, url, model)."""
    from shapes import make_random_checkpoint

    dtype = args.launch_dtype
    model_dir = make_random_checkpoint(args.launch_shape, dtype=dtype, seed=args.seed)
    port = free_port()
    cmd = [sys.executable, "-m", "infergrid.worker.cli", "serve", "--model", model_dir, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", dtype, "--disable-uvicorn-access-log", "--log-level", "warning",
           "--max-queue-size", str(max(256, args.num_prompts * 2)), *shlex.split(args.worker_args)]
    log = open(args.worker_log, "wb") if args.worker_log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.launch_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode} (log: {args.worker_log})")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url, model_dir
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_worker(proc)
    raise RuntimeError(f"worker not healthy after {args.launch_timeout:.0f} s (log: {args.worker_log})")


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def served_model(base_url: str, api_key: str | None) -> tuple[str, int | None]:
    """The first served model's id and (when the worker reports it) nothing else we need."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = httpx.get(base_url + "/v1/models", headers=headers, timeout=10).json()["data"]
    return data[0]["id"], None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default=None, help="worker or router, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=["random", "shared-prefix"], default="random")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512, help="random: mean input length; shared-prefix: suffix")
    p.add_argument("--range-ratio", type=float, default=0.75, help="random: input lengths +- this share")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prefix-len", type=int, default=2048)
    p.add_argument("--shared-fraction", type=float, default=0.9)
    p.add_argument("--vocab-size", type=int, default=None, help="default: the model's config, else 1024")
    p.add_argument("--request-rate", type=float, nargs="+", default=[float("inf")], help="req/s; inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=8, help="requests sent (at once) before measuring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--launch-shape", default=None, help="start a worker on this random shape (bench/shapes.py)")
    p.add_argument("--launch-dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--worker-args", default="", help="extra `infergrid-worker serve` arguments (one string)")
    p.add_argument("--worker-log", default=None)
    p.add_argument("--launch-timeout", type=float, default=300.0)
    p.add_argument("--smoke", action="store_true", help="tiny worker on CPU, a few requests")
    p.add_argument("--out", default=os.path.join("bench", "results", "serving.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.launch_shape = args.launch_shape or "tiny"
        args.num_prompts, args.input_len, args.output_len, args.warmup = 6, 16, 8, 2
        args.prefix_len = min(args.prefix_len, 32)
        if args.request_rate == [float("inf")]:
            args.request_rate = [4.0, float("inf")]
    if (args.base_url is None) == (args.launch_shape is None):
        p.error("give exactly one of --base-url and --launch-shape")
    if args.launch_shape and args.launch_dtype is None:
        import torch

        args.launch_dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench_serving.py", *argv])
    proc = None
    model_dir = None
    try:
        if args.launch_shape:
            proc, base_url, model_dir = launch_worker(args)
        else:
            base_url = args.base_url.rstrip("/")
        model = args.model or served_model(base_url, args.api_key)[0]
        vocab = args.vocab_size
        if vocab is None and model_dir is not None:
            with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
                vocab = json.load(f)["vocab_size"]
        vocab = vocab or 1024
        if args.warmup:
            warm = make_prompts(args, vocab, args.seed + 10_000, args.seed + 10_000)[: args.warmup]
            asyncio.run(run_load(base_url, model, warm, min(args.output_len, 16), float("inf"), None, 0,
                                 args.api_key))
        runs = []
        for r in range(args.repeats):
            for i, rate in enumerate(args.request_rate):
                # fresh token ids per (rate, repeat); the same lengths and arrival times in every repeat
                prompts = make_prompts(args, vocab, args.seed + 1 + r * len(args.request_rate) + i, args.seed + i)
                results, duration = asyncio.run(run_load(base_url, model, prompts, args.output_len, rate,
                                                         args.max_concurrency, args.seed + i, args.api_key))
                s = summarize(results, duration)
                print_report(f"rate {rate:g} req/s, repeat {r}", s)
                runs.append({"request_rate": rate if math.isfinite(rate) else "inf", "repeat": r, **s})
    finally:
        if proc is not None:
            stop_worker(proc)
    device = "unknown"
    try:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    except ImportError:
        pass
    print(f"\nserving: {args.dataset}, {args.num_prompts} prompts, input ~{args.input_len}, output {args.output_len}, "
          f"{device}; median [min-max] over {args.repeats} repeat(s)")
    cols = ("rate req/s", "req/s", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "ITL p99 ms",
            "E2E p50 ms", "failed")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for rate in args.request_rate:
        key = rate if math.isfinite(rate) else "inf"
        rs = [x for x in runs if x["request_rate"] == key]

        def cell(name: str, fmt: str, rs: list[dict[str, Any]] = rs) -> str:
            vals = [x[name] for x in rs]
            med = statistics.median(vals)
            return format(med, fmt) if len(vals) == 1 else f"{format(med, fmt)} [{format(min(vals), fmt)}-{format(max(vals), fmt)}]"

        print("| " + " | ".join((f"{rate:g}", cell("request_throughput", ".2f"), cell("output_throughput", ",.0f"),
                                 cell("median_ttft_ms", ".1f"), cell("p99_ttft_ms", ".1f"), cell("median_tpot_ms", ".2f"),
                                 cell("p99_itl_ms", ".2f"), cell("median_e2el_ms", ".0f"),
                                 str(sum(x["failed"] for x in rs)))) + " |")
    report = {"bench": "serving", "device": device, "command": command, "commit": os.environ.get("INFERGRID_COMMIT"),
              "python": platform.python_version(), "args": {k: (v if not isinstance(v, float) or math.isfinite(v)
                                                               else "inf") for k, v in vars(args).items()},
              "runs": runs}
    report["args"]["request_rate"] = [r if math.isfinite(r) else "inf" for r in args.request_rate]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 1 if any(x["failed"] for x in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
